"""``pipeserve run``: one-shot pipelined generation on local stage processes (PiPPy's
``hf_generate.py`` workflow), or under ``torchrun`` with one rank per stage."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

from pipeline_core import Workload
from pipeserve.cli.flags import (
    DTYPE_HELP,
    add_sampling_flags,
    parse_ids,
    sampling_from_args,
    stage_options_from_env,
)

__all__ = ["add_run_command", "cmd_run"]


def _deterministic_workload() -> Workload:
    """Times from FLOPs only: every process that plans gets the same split (a profile is
    measured, so two processes could disagree by noise)."""
    return Workload(profile=False)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline_core import LocalGenerator, ModelSource, PlanError, Policy, make_plan
    from pipeline_core.host_memory import check_host_fits
    from pipeline_core.source import hf_tokenizer

    if (args.prompt is None) == (args.prompt_ids is None):
        raise SystemExit("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    try:
        plan = make_plan(
            ModelSource(checkpoint=args.model_dir),
            Policy.balanced(args.stages),
            dtype=args.dtype,
            trace=False,
            workload=_deterministic_workload(),
        )
    except (PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the model cannot be planned (trace, checkpoint): one line
        return _fail(args, f"planning failed: {type(e).__name__}: {e}")
    tok = hf_tokenizer(args.model_dir) if args.prompt is not None else None
    if args.prompt is not None and tok is None:
        print(f"error: {args.model_dir} has no tokenizer; use --prompt-ids", file=sys.stderr)
        return 2
    ids = tok(args.prompt)["input_ids"] if tok is not None else parse_ids(args.prompt_ids)
    # torchrun's variables: this command is an edge (it reads them, the library does not)
    world, local = (int(os.environ.get(k, "1")) for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    try:  # every stage on this host: refuse now rather than be OOM-killed while loading
        if local >= world:  # (a multi-node torchrun spreads the stages over its hosts)
            check_host_fits(plan, len(ids) + args.max_new_tokens)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = sampling_from_args(args)
    if world > 1:
        return _run_torchrun(args, plan, ids, params, tok)
    try:
        with LocalGenerator(
            plan,
            threads_per_stage=args.threads,
            in_process=args.in_process,
            options=stage_options_from_env(),
        ) as gen:
            return _generate_and_print(gen.submit, args, ids, params, tok)
    except Exception as e:  # one clear line (what failed, where); --debug: the traceback
        return _fail(args, f"{type(e).__name__}: {e}")


def _fail(args: argparse.Namespace, message: str) -> int:
    """Report a failed run on one line (stderr), after the traceback under ``--debug``."""
    if args.debug and sys.exc_info()[0] is not None:
        traceback.print_exc()
    hint = "" if args.debug else " (--debug shows the traceback)"
    print(f"error: {' '.join(message.split())}{hint}", file=sys.stderr)
    return 1


def _run_torchrun(args, plan, ids, params, tok) -> int:  # type: ignore[no-untyped-def]
    """``torchrun --nproc_per_node N pipeserve run ...``: rank k is stage k (PiPPy's way);
    rank 0 schedules and prints, the ring's rendezvous is torchrun's store."""
    import torch
    import torch.distributed as dist

    from pipeline_core import GenStage, ModelSource, Policy, make_plan
    from pipeline_core.engine import GenerationEngine, serve_generation
    from pipeline_core.ring import Ring

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if plan.num_stages != world:
        plan = make_plan(  # every rank plans alike: by FLOPs, not by a noisy profile
            ModelSource(checkpoint=args.model_dir),
            Policy.balanced(world),
            dtype=args.dtype,
            trace=False,
            workload=_deterministic_workload(),
        )
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    store = dist.PrefixStore("pipeserve-run", dist.distributed_c10d._get_default_store())
    opts = stage_options_from_env()
    stage = GenStage(
        plan,
        rank,
        step_timing=opts.step_timing,
        compile_decode=opts.compile_decode,
        huge_pages=opts.huge_pages,
    )
    ring = Ring(store, rank, world, cuda_ipc=opts.cuda_ipc)
    if rank != 0:
        serve_generation(stage, ring, ahead=opts.decode_ahead)
        dist.destroy_process_group()
        return 0
    engine = GenerationEngine(stage, ring, ahead=opts.decode_ahead)
    try:
        return _generate_and_print(engine.submit, args, ids, params, tok)
    finally:
        engine.close()
        dist.destroy_process_group()


def _generate_and_print(submit, args, ids, params, tok) -> int:  # type: ignore[no-untyped-def]
    """Submit one request (a bad one is a clear error, exit 2) and print its tokens."""
    from pipeline_core import RequestError

    try:
        handle = submit(ids, params)
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.json:
        from pipeline_core.detokenize import Detokenizer

        detok = Detokenizer(tok) if tok is not None else None
        for t in handle:
            print(detok.push([t]) if detok is not None else f"{t} ", end="", flush=True)
        print(detok.flush() if detok is not None else "")
    res = handle.result()
    if res.error is not None:
        return _fail(args, f"generation failed: {res.error}")
    if args.json:
        out = {
            "prompt_ids": ids,
            "token_ids": res.tokens,
            "finish_reason": res.finish_reason,
            "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.tokens)},
        }
        if tok is not None:
            out["text"] = tok.decode(res.tokens, skip_special_tokens=True)
        print(json.dumps(out))
    return 0


def add_run_command(sub: Any) -> None:
    p = sub.add_parser("run", help="one-shot pipelined generation on local stage processes")
    p.add_argument("model_dir", help="Hugging Face checkpoint directory")
    p.add_argument("--stages", type=int, default=2, help="stages balanced by FLOPs (default 2)")
    p.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    p.add_argument("--prompt-ids", metavar="1,2,3", help="prompt token ids")
    add_sampling_flags(p)
    p.add_argument("--dtype", help=DTYPE_HELP)
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--debug", action="store_true", help="on failure, show the tracebacks")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="every stage in this process (no overlap; for debugging: one traceback)",
    )
    p.set_defaults(func=cmd_run)
