"""``pipeserve plan``: split a model into stages here and print the plan (table, JSON, units)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeserve.cli.flags import (
    DTYPE_HELP,
    add_policy_flags,
    add_workload_flags,
    policy_from_args,
    workload_from_args,
)
from pipeserve.plan_table import format_plan, human

__all__ = ["add_plan_command", "cmd_plan"]

DEFAULT_STAGES = 2
"""Stages of the default policy (``balanced``, by time) when no policy flag is given."""


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline_core import ModelSource, PlanError, make_plan

    source = ModelSource(checkpoint=args.model_dir, factory=args.factory or "")
    try:
        plan = make_plan(
            source,
            policy_from_args(args, DEFAULT_STAGES),
            dtype=args.dtype,
            trace=args.trace,
            workload=workload_from_args(args),
        )
    except (PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(plan.dumps())
    elif args.units:
        for u in plan.units:
            print(f"{human(u['nbytes']):>12}  {u['name']}")
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


def add_plan_command(sub: Any) -> None:
    p = sub.add_parser("plan", help="split a model into stages and print the plan")
    p.add_argument("model_dir", help="checkpoint directory (config.json + weights)")
    add_policy_flags(
        p, f"N stages of balanced time (the default policy, N={DEFAULT_STAGES})", workers=True
    )
    add_workload_flags(p, "(counted against --stage-memory)", device=True)
    p.add_argument("--factory", help="package.module:function building a plain nn.Module")
    p.add_argument("--dtype", help=DTYPE_HELP)
    p.add_argument(
        "--worker-memory", metavar="SIZE", help="also say how many workers of SIZE it needs"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--units", action="store_true", help="list the model's units and sizes")
    p.add_argument(
        "--trace",
        action="store_true",
        help="also capture the model with torch.export to record what each stage receives "
        "and sends (the recv/send columns and the JSON's wiring; about a minute for a 7B model "
        "on 2 cores). Planning itself does not need it: run, local and admin load plan without",
    )
    p.add_argument("--no-trace", action="store_true", help=argparse.SUPPRESS)  # the default
    p.set_defaults(func=cmd_plan)
