"""``pipeserve`` console script.

* ``pipeserve plan MODEL_DIR --equal-size 3 | --threshold 500MB | --split-at a,b [--json]``
* ``pipeserve local`` -- the embedded default: builds a small model, splits it over local stage
  processes and checks the pipelined output against the single-process model.
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
    return 0 if diff == 0 else 1


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

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
