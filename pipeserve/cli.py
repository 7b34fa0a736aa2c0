"""``pipeserve`` console script.

* ``pipeserve plan MODEL_DIR [--stages 3 | --equal-size 3 | --threshold 500MB | --split-at a,b]
  [--batch 8 --seq 128 --chunks 4] [--json]`` -- per stage: bytes, KV bytes per token,
  estimated time; predicted throughput and bubble (``--stages N``: ``balanced``, by time)
* ``pipeserve local`` -- the embedded default: builds a small model, splits it over local stage
  processes and checks the pipelined forward and generation against the single-process model.
* ``pipeserve run MODEL_DIR --stages N --prompt-ids 1,2,3 --max-new-tokens K`` -- one-shot
  pipelined generation on local stage processes (PiPPy's ``hf_generate.py`` workflow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

__all__ = ["main"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _policy(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pipeline_core import Policy

    chosen = [
        x for x in (args.equal_size, args.threshold, args.split_at, args.balanced) if x is not None
    ]
    if len(chosen) + int(args.markers) > 1:
        raise SystemExit(
            "choose one of --stages/--balanced, --equal-size, --threshold, --split-at, --markers"
        )
    if args.threshold is not None:
        return Policy.threshold(args.threshold)
    if args.split_at is not None:
        return Policy.manual([p for p in args.split_at.split(",") if p])
    if args.markers:
        return Policy.markers()
    if args.balanced is not None:
        memory = args.stage_memory.split(",") if args.stage_memory else None
        speeds = [float(s) for s in args.stage_speed.split(",")] if args.stage_speed else None
        return Policy.balanced(args.balanced, memory=memory, speeds=speeds)
    if args.equal_size is not None:
        return Policy.equal_size(args.equal_size)
    return Policy.balanced(2)


def _workload(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from pipeline_core.cost import Workload

    return Workload(
        batch=args.batch,
        seq=args.seq,
        chunks=args.chunks,
        kv_tokens=args.kv_tokens,
        device=args.device,
        threads=args.threads,
        profile=not args.no_profile,
    )


def _deterministic_workload():  # type: ignore[no-untyped-def]
    """Times from FLOPs only: every process that plans gets the same split (a profile is
    measured, so two processes could disagree by noise)."""
    from pipeline_core.cost import Workload

    return Workload(profile=False)


def format_plan(plan) -> str:  # type: ignore[no-untyped-def]
    lines = [
        f"model   {plan.source.factory or plan.source.checkpoint}",
        f"policy  {plan.policy.describe()}   dtype {plan.dtype}   "
        f"total {_human(plan.total_bytes)} in {len(plan.units)} units",
    ]
    for t in plan.loaded_twice:
        lines.append(
            f"tied    {' = '.join([t['tensor'], *t['aliases']])} is loaded by stages "
            f"{', '.join(map(str, t['stages']))}: {_human(t['extra_bytes'])} more memory"
        )
    timed = bool(plan.estimate)
    if timed:
        w = plan.workload
        sources = sorted({u.get("cost", "") for u in plan.units} - {""})
        lines.append(
            f"times   per microbatch of {-(-w['batch'] // w['chunks'])} x {w['seq']} on "
            f"{w['device']} ({w['threads']} thread(s)), from {' / '.join(sources)}"
        )
    lines += [
        "",
        f"{'stage':>5}  {'bytes':>12}  {'KV/token':>9}  {'est. ms':>8}  {'compute':>7}  "
        f"{'tensors':>7}  {'recv':>4}  {'send':>4}  units",
    ]
    total = sum(s.seconds for s in plan.stages) if timed else sum(s.flops for s in plan.stages)
    for s in plan.stages:
        units = s.units if len(s.units) <= 4 else [*s.units[:2], "...", s.units[-1]]
        share = (s.seconds if timed else s.flops) / (total or 1)
        ms = f"{1e3 * s.seconds:8.1f}" if timed else f"{'-':>8}"
        lines.append(
            f"{s.index:>5}  {_human(s.nbytes):>12}  {_human(s.kv_bytes_per_token):>9}  {ms}  "
            f"{100 * share:>6.1f}%  {len(s.tensors):>7}  "
            f"{len(s.receives):>4}  {len(s.sends):>4}  {', '.join(units)} ({len(s.units)})"
        )
    if timed:
        e, w = plan.estimate, plan.workload
        lines += [
            "",
            f"predicted: one batch of {w['batch']} in {w['chunks']} microbatches "
            f"{e['batch_seconds']:.3f} s ({e['samples_per_s']:.2f} samples/s), bubble "
            f"{100 * e['bubble']:.0f}%; batches streamed back to back "
            f"{e['streaming_samples_per_s']:.2f} samples/s",
        ]
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline_core import ModelSource, PlanError, make_plan

    source = ModelSource(checkpoint=args.model_dir, factory=args.factory or "")
    try:
        plan = make_plan(
            source,
            _policy(args),
            dtype=args.dtype,
            trace=not args.no_trace,
            workload=_workload(args),
        )
    except (PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(plan.dumps())
    elif args.units:
        for u in plan.units:
            print(f"{_human(u['nbytes']):>12}  {u['name']}")
    else:
        print(format_plan(plan))
    if args.worker_memory and not args.json:
        from pipeline_core.plan import workers_needed

        n = workers_needed(plan, args.worker_memory, args.kv_tokens)
        kv = f" + KV cache for {args.kv_tokens} tokens" if args.kv_tokens else ""
        print(
            f"\nworkers of {args.worker_memory}: {n} needed for the weights{kv}"
            if n
            else f"\nworkers of {args.worker_memory}: a single unit is larger; none fits"
        )
    return 0


def _tiny_model(path: Path) -> Path:
    """A small random-init Llama saved as sharded safetensors, with a byte-level tokenizer
    and a chat template (built offline, once, then reused)."""
    from pipeserve.demo_tokenizer import save_demo_tokenizer

    if not (path / "tokenizer.json").is_file():  # also added to a cache built before it
        save_demo_tokenizer(path, vocab_size=1000)
    if (path / "model.safetensors.index.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="300KB")
    return path


def cmd_local(args: argparse.Namespace) -> int:
    """Coordinator + N workers on this machine, a model loaded, checked, then served."""
    from pipeserve.local_cluster import run_local

    model_dir = Path(args.model_dir) if args.model_dir else None
    if model_dir is None:
        model_dir = _tiny_model(Path(args.cache))
        print(f"demo model: {model_dir} (a small Llama with RANDOM weights: tokens are noise)")
    if args.check_forward and not check_forward(model_dir, args.stages):
        return 1
    return run_local(
        model_dir,
        stages=args.stages,
        port=args.port,
        once=args.once,
        http_port=args.http_port,
        dtype=args.dtype or "",
    )


def check_forward(model_dir: Path, stages: int, batch: int = 6, seq: int = 32) -> bool:
    """pipeline_core's pipelined forward on local processes vs the single-process model."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline_core import LocalPipeline, ModelSource, Policy, make_plan

    plan = make_plan(ModelSource(checkpoint=str(model_dir)), Policy.balanced(stages))
    print(format_plan(plan), "\n")
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (batch, seq))
    mask = torch.ones_like(ids)
    with LocalPipeline(plan) as pipe:
        logits = pipe(input_ids=ids, attention_mask=mask, chunks=4)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
    diff = (logits - expected).abs().max().item()
    print(
        f"pipelined forward ({stages} stages, batch {batch}x{seq}, 4 microbatches): "
        f"max |pipelined - single process| = {diff:.3g}"
    )
    return diff == 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline_core import (
        LocalGenerator,
        ModelSource,
        PlanError,
        SamplingParams,
        make_plan,
    )
    from pipeline_core.host_memory import check_host_fits
    from pipeline_core.source import hf_tokenizer

    if (args.prompt is None) == (args.prompt_ids is None):
        raise SystemExit("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    try:
        plan = make_plan(
            ModelSource(checkpoint=args.model_dir),
            _policy(args),
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
    ids = (
        tok(args.prompt)["input_ids"]
        if tok is not None
        else [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    )
    world, local = (int(os.environ.get(k, "1")) for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    try:  # every stage on this host: refuse now rather than be OOM-killed while loading
        if local >= world:  # (a multi-node torchrun spreads the stages over its hosts)
            check_host_fits(plan, len(ids) + args.max_new_tokens)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_torchrun(args, plan, ids, params, tok)
    try:
        with LocalGenerator(
            plan, threads_per_stage=args.threads, in_process=args.in_process
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
    stage = GenStage(plan, rank)
    ring = Ring(store, rank, world)
    if rank != 0:
        serve_generation(stage, ring)
        dist.destroy_process_group()
        return 0
    engine = GenerationEngine(stage, ring)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import logging

    saved = os.environ.get("PIPESERVE_LOG")
    if args.cmd == "run":
        args.balanced = args.stages
        # a one-shot run reports a failure on one line: the stages' own warnings (a failed step
        # with its traceback) only under --debug; the stage processes read PIPESERVE_LOG
        level = "DEBUG" if args.debug else (saved or "ERROR")
        os.environ["PIPESERVE_LOG"] = level
    else:  # servers choose their own default level (INFO) from PIPESERVE_LOG when unset
        level = saved or "WARNING"
    logging.basicConfig(level=level.upper())
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `pipeserve admin status | head`: the reader left, that is all
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141  # 128 + SIGPIPE, as a shell reports it
    finally:
        if args.cmd == "run":
            if saved is None:
                os.environ.pop("PIPESERVE_LOG", None)
            else:
                os.environ["PIPESERVE_LOG"] = saved


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (the deployment tests parse the manifests' args with it)."""
    from pipeserve.cluster_cli import add_commands, add_workload_flags

    parser = argparse.ArgumentParser(prog="pipeserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("plan", help="split a model into stages and print the plan")
    p.add_argument("model_dir", help="checkpoint directory (config.json + weights)")
    p.add_argument(
        "--stages",
        "--balanced",
        dest="balanced",
        type=int,
        metavar="N",
        help="N stages of balanced time (the default policy, N=2)",
    )
    p.add_argument("--equal-size", type=int, metavar="N", help="N stages of balanced bytes")
    p.add_argument("--threshold", metavar="SIZE", help="new stage past SIZE (e.g. 500MB)")
    p.add_argument("--split-at", metavar="A,B", help="begin stages at these modules")
    p.add_argument("--markers", action="store_true", help="split at pipe_split() calls")
    p.add_argument(
        "--stage-memory", metavar="M1,M2", help="with --stages: memory of each worker (8GiB,..)"
    )
    p.add_argument(
        "--stage-speed", metavar="S1,S2", help="with --stages: relative speed of each worker"
    )
    add_workload_flags(p, "(counted against --stage-memory)")
    p.add_argument("--device", default="cpu", help="device to profile units on (cpu, cuda)")
    p.add_argument("--threads", type=int, default=1, help="threads per stage while profiling")
    p.add_argument(
        "--no-profile", action="store_true", help="estimate times from FLOPs, run nothing"
    )
    p.add_argument("--factory", help="package.module:function building a plain nn.Module")
    p.add_argument(
        "--dtype", help="float32, bfloat16, float16 (default: the checkpoint's, as from_pretrained)"
    )
    p.add_argument(
        "--worker-memory", metavar="SIZE", help="also say how many workers of SIZE it needs"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--units", action="store_true", help="list the model's units and sizes")
    p.add_argument("--no-trace", action="store_true", help="skip recording stage I/O")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "local", help="coordinator + workers on this machine: load, self-check, serve"
    )
    p.add_argument("model_dir", nargs="?", help="checkpoint (default: a small demo Llama)")
    p.add_argument("--cache", default=".pipeserve-cache/tiny-llama")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--port", type=int, default=50051, help="coordinator port (0: any free)")
    p.add_argument("--once", action="store_true", help="exit after the self-check")
    p.add_argument(
        "--http-port", type=int, default=0, help="also start the OpenAI HTTP gateway here"
    )
    p.add_argument(
        "--check-forward", action="store_true", help="also check the pipelined forward first"
    )
    p.add_argument(
        "--dtype", help="float32, bfloat16, float16 (default: the checkpoint's, as from_pretrained)"
    )
    p.set_defaults(func=cmd_local)

    p = sub.add_parser("run", help="one-shot pipelined generation on local stage processes")
    p.add_argument("model_dir", help="Hugging Face checkpoint directory")
    p.add_argument("--stages", type=int, default=2, help="stages balanced by FLOPs (default 2)")
    p.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    p.add_argument("--prompt-ids", metavar="1,2,3", help="prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--dtype", help="float32, bfloat16, float16 (default: the checkpoint's, as from_pretrained)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--debug", action="store_true", help="on failure, show the tracebacks")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="every stage in this process (no overlap; for debugging: one traceback)",
    )
    p.set_defaults(
        func=cmd_run,
        equal_size=None,
        threshold=None,
        split_at=None,
        balanced=None,
        markers=False,
        stage_memory=None,
        stage_speed=None,
    )

    add_commands(sub)
    from pipeserve.gateway.cli import add_gateway_command

    add_gateway_command(sub)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
