"""``pipeserve`` console script.

* ``pipeserve plan MODEL_DIR --equal-size 3 | --threshold 500MB | --split-at a,b [--json]``
* ``pipeserve local`` -- the embedded default: builds a small model, splits it over local stage
  processes and checks the pipelined forward and generation against the single-process model.
* ``pipeserve run MODEL_DIR --stages N --prompt-ids 1,2,3 --max-new-tokens K`` -- one-shot
  pipelined generation on local stage processes (PiPPy's ``hf_generate.py`` workflow).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
        raise SystemExit("choose one of --equal-size, --threshold, --split-at, --markers")
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
    return Policy.equal_size(args.equal_size or 2)


def format_plan(plan) -> str:  # type: ignore[no-untyped-def]
    lines = [
        f"model   {plan.source.factory or plan.source.checkpoint}",
        f"policy  {plan.policy.describe()}   dtype {plan.dtype}   "
        f"total {_human(plan.total_bytes)} in {len(plan.units)} units",
        "",
        f"{'stage':>5}  {'bytes':>12}  {'compute':>7}  {'tensors':>7}  {'recv':>4}  {'send':>4}"
        "  units",
    ]
    total_flops = sum(s.flops for s in plan.stages) or 1
    for s in plan.stages:
        units = s.units if len(s.units) <= 4 else [*s.units[:2], "...", s.units[-1]]
        lines.append(
            f"{s.index:>5}  {_human(s.nbytes):>12}  {100 * s.flops / total_flops:>6.1f}%  "
            f"{len(s.tensors):>7}  "
            f"{len(s.receives):>4}  {len(s.sends):>4}  {', '.join(units)} ({len(s.units)})"
        )
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline_core import ModelSource, PlanError, make_plan

    source = ModelSource(checkpoint=args.model_dir, factory=args.factory or "")
    try:
        plan = make_plan(source, _policy(args), dtype=args.dtype, trace=not args.no_trace)
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
    return 0


def _tiny_model(path: Path) -> Path:
    """A small random-init Llama saved as sharded safetensors (built once, then reused)."""
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
    import torch

    from pipeline_core import LocalPipeline, ModelSource, Policy, make_plan

    model_dir = Path(args.model_dir) if args.model_dir else _tiny_model(Path(args.cache))
    plan = make_plan(ModelSource(checkpoint=str(model_dir)), Policy.equal_size(args.stages))
    print(format_plan(plan), "\n")
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    with LocalPipeline(plan) as pipe:
        started = time.perf_counter() - t0
        for k, info in enumerate(pipe.stage_info):
            print(f"stage {k}: read {_human(info['bytes_read'])} from {len(info['files'])} files")
        t1 = time.perf_counter()
        logits = pipe(input_ids=ids, attention_mask=mask, chunks=args.chunks)
        ran = time.perf_counter() - t1
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
    diff = (logits - expected).abs().max().item()
    print(
        f"\n{plan.num_stages} stages started in {started:.1f}s; batch {args.batch}x{args.seq} in "
        f"{args.chunks} microbatches took {ran * 1000:.0f} ms; logits {tuple(logits.shape)}; "
        f"max |pipelined - single process| = {diff:.3g}"
    )
    print(json.dumps({"equal": bool(torch.equal(logits, expected)), "max_abs_diff": diff}))
    gen_ok = _local_generation(plan, ref, args.stages)
    return 0 if diff == 0 and gen_ok else 1


def _local_generation(plan, ref, stages: int) -> bool:  # type: ignore[no-untyped-def]
    """Generate over the pipeline (KV cache per stage) and compare with HF ``generate``."""
    import torch

    from pipeline_core import LocalGenerator, SamplingParams

    prompts = [[11, 12, 13, 14, 15], [101, 102, 103], [7, 8, 9, 10, 11, 12, 13]]
    new = 16
    with LocalGenerator(plan) as gen:
        t0 = time.perf_counter()
        got = gen.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
        took = time.perf_counter() - t0
    ok = True
    for p, toks in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = ref.generate(
                input_ids=torch.tensor([p]),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                eos_token_id=None,
                pad_token_id=0,
            )
        want = out[0, len(p) :].tolist()
        ok &= want == toks
        print(f"prompt {p} -> {toks}{'' if want == toks else f'  (HF generate: {want})'}")
    print(
        f"generated {len(prompts)}x{new} tokens over {stages} stages in {took * 1000:.0f} ms; "
        f"{'same tokens as' if ok else 'DIFFERENT tokens from'} transformers generate "
        "(the demo model's weights are random, so the tokens are noise)"
    )
    return ok


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline_core import (
        LocalGenerator,
        ModelSource,
        PlanError,
        RequestError,
        SamplingParams,
        make_plan,
    )
    from pipeline_core.source import hf_tokenizer

    if (args.prompt is None) == (args.prompt_ids is None):
        raise SystemExit("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    try:
        plan = make_plan(
            ModelSource(checkpoint=args.model_dir),
            _policy(args),
            dtype=args.dtype,
            trace=False,
        )
    except (PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = hf_tokenizer(args.model_dir) if args.prompt is not None else None
    if args.prompt is not None and tok is None:
        print(f"error: {args.model_dir} has no tokenizer; use --prompt-ids", file=sys.stderr)
        return 2
    ids = (
        tok(args.prompt)["input_ids"]
        if tok is not None
        else [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    )
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    with LocalGenerator(plan, threads_per_stage=args.threads) as gen:
        try:
            handle = gen.submit(ids, params)
        except RequestError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not args.json:
            for t in handle:
                piece = tok.decode([t]) if tok is not None else f"{t} "
                print(piece, end="", flush=True)
            print()
        res = handle.result()
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
    return 0 if res.error is None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("plan", help="split a model into stages and print the plan")
    p.add_argument("model_dir", help="checkpoint directory (config.json + weights)")
    p.add_argument("--equal-size", type=int, metavar="N", help="N stages of balanced bytes")
    p.add_argument("--threshold", metavar="SIZE", help="new stage past SIZE (e.g. 500MB)")
    p.add_argument("--split-at", metavar="A,B", help="begin stages at these modules")
    p.add_argument("--markers", action="store_true", help="split at pipe_split() calls")
    p.add_argument("--balanced", type=int, metavar="N", help="N stages of balanced compute")
    p.add_argument("--stage-memory", metavar="M1,M2", help="with --balanced: memory per stage")
    p.add_argument("--stage-speed", metavar="S1,S2", help="with --balanced: speed per stage")
    p.add_argument("--factory", help="package.module:function building a plain nn.Module")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--units", action="store_true", help="list the model's units and sizes")
    p.add_argument("--no-trace", action="store_true", help="skip recording stage I/O")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("local", help="run a pipelined forward on local stage processes")
    p.add_argument("--model-dir", help="checkpoint to run (default: a small built-in Llama)")
    p.add_argument("--cache", default=".pipeserve-cache/tiny-llama")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--seq", type=int, default=32)
    p.set_defaults(func=cmd_local)

    p = sub.add_parser("run", help="one-shot pipelined generation on local stage processes")
    p.add_argument("model_dir", help="Hugging Face checkpoint directory")
    p.add_argument("--stages", type=int, default=2, help="equal_size stages (default 2)")
    p.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    p.add_argument("--prompt-ids", metavar="1,2,3", help="prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.set_defaults(
        func=cmd_run, equal_size=None, threshold=None, split_at=None, balanced=None, markers=False
    )

    from pipeserve.cluster_cli import add_commands

    add_commands(sub)

    args = parser.parse_args(argv)
    if args.cmd == "run":
        args.equal_size = args.stages
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
