"""``pipeserve admin ACTION``: load, unload, plan, status, drain, timeline -- one function per
action, each one call (or stream) to the coordinator's Admin service."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pipeserve.cli.connect import report_rpc_error, stubs
from pipeserve.cli.flags import (
    DTYPE_HELP,
    add_policy_flags,
    add_tls_flags,
    add_workload_flags,
    apply_tls,
    policy_from_args,
    workload_from_args,
)
from pipeserve.plan_table import human

__all__ = ["ACTIONS", "add_admin_command", "cmd_admin"]


def _policy(args: argparse.Namespace) -> Any:
    from pipeserve.codec import policy_to_proto

    return policy_to_proto(policy_from_args(args, 0))  # 0: one stage per idle worker


def _workload(args: argparse.Namespace) -> Any:
    from pipeserve.codec import workload_to_proto

    return workload_to_proto(workload_from_args(args))


def _bar(done: int, total: int, width: int = 24) -> str:
    frac = done / total if total else 0.0
    n = int(frac * width)
    return "[" + "#" * n + "." * (width - n) + f"] {frac:6.1%}"


def admin_load(admin: Any, args: argparse.Namespace) -> int:
    """Load a checkpoint and show each stage's loading progress (live on a terminal)."""
    from pipeserve.v1 import pipeserve_pb2 as pb

    req = pb.LoadModelRequest(
        name=args.name or "",
        checkpoint=args.target,
        policy=_policy(args),
        dtype=args.dtype,
        device=args.device or "",
        mode=args.mode or "",
        workload=_workload(args),
    )
    last = None
    tty = sys.stdout.isatty()
    for p in admin.LoadModel(req):
        last = p
        lines = [
            f"stage {s.stage} {s.worker_id:>4} {_bar(s.bytes_loaded, s.bytes_total)} "
            f"{human(s.bytes_loaded):>10} / {human(s.bytes_total):<10} {s.state}"
            for s in p.stages
        ]
        if tty:
            print("\n".join(lines) + f"\x1b[{len(lines)}A\r", end="", flush=True)
        elif p.done:
            print("\n".join(lines))
    if tty and last is not None:
        print("\n" * len(last.stages), end="")
    if last is not None:
        print(f"model {last.model}: {pb.ModelState.Name(last.state)} ({last.dtype})")
    return 0


def admin_unload(admin: Any, args: argparse.Namespace) -> int:
    from pipeserve.v1 import pipeserve_pb2 as pb

    admin.UnloadModel(pb.UnloadModelRequest(name=args.target))
    print(f"unloaded {args.target}")
    return 0


def admin_plan(admin: Any, args: argparse.Namespace) -> int:
    """The plan the coordinator would load, on the workers it would choose."""
    from pipeline_core.plan import Plan
    from pipeserve.plan_table import format_plan
    from pipeserve.v1 import pipeserve_pb2 as pb

    r = admin.PlanModel(
        pb.PlanModelRequest(
            checkpoint=args.target,
            policy=_policy(args),
            dtype=args.dtype,
            workload=_workload(args),
        )
    )
    if args.json:
        print(r.plan_json)
        return 0
    workers = [s.worker_id for s in sorted(r.stages, key=lambda s: s.stage)]
    print(format_plan(Plan.from_json(r.plan_json), workers=workers, times_from=r.times_from))
    return 0


def admin_status(admin: Any, args: argparse.Namespace) -> int:
    """Workers and models, once or every ``--watch`` seconds."""
    from pipeserve.v1 import pipeserve_pb2 as pb

    while True:
        r = admin.ClusterStatus(pb.ClusterStatusRequest())
        if args.json:
            from google.protobuf.json_format import MessageToDict

            print(json.dumps(MessageToDict(r)))
            return 0
        if args.watch:
            print("\x1b[2J\x1b[H", end="")  # clear the screen: a live table
        _print_status(r)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def _print_status(r: Any) -> None:
    from pipeserve.v1 import pipeserve_pb2 as pb

    print(
        f"{'worker':<9} {'address':<22} {'device':<7} {'GFLOP/s':>8} {'memory':>10} "
        f"{'state':<9} {'model':<16} {'stage':>5} {'kv seqs':>7} {'kv bytes':>10} "
        f"{'heartbeat':>9}"
    )
    for w in r.workers:
        print(
            f"{w.id:<9} {w.address:<22} {w.device:<7} {w.speed_gflops:>8.0f} "
            f"{human(w.memory_bytes):>10} {w.state:<9} {w.model or '-':<16} "
            f"{w.stage if w.model else '-':>5} {w.kv_sequences:>7} "
            f"{human(w.kv_bytes):>10} {w.seconds_since_heartbeat:>8.1f}s"
        )
    print()
    print(f"{'model':<16} {'state':<8} {'dtype':<9} {'stages':>6} {'epoch':>5}  checkpoint")
    for m in r.models:
        state = pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_")
        print(
            f"{m.name:<16} {state:<8} {m.dtype:<9} {m.num_stages:>6} {m.epoch:>5}  {m.checkpoint}"
        )


def admin_timeline(admin: Any, args: argparse.Namespace) -> int:
    """Per-stage compute / send / wait of the last ``--seconds``, drawn to a PNG."""
    from pipeserve.timeline_plot import render_timeline, summarize
    from pipeserve.v1 import pipeserve_pb2 as pb

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "error: the timeline needs matplotlib: pip install 'pipeserve[plot]'",
            file=sys.stderr,
        )
        return 2
    r = admin.Timeline(pb.TimelineRequest(model=args.target, seconds=args.seconds))
    events = list(r.events)
    for stage, s in sorted(summarize(events).items()):
        print(
            f"stage {stage}: compute {s['compute']:.3f}s  send {s['send']:.3f}s  "
            f"wait {s['wait']:.3f}s"
        )
    out = render_timeline(events, args.output, f"{args.target}: last {args.seconds}s")
    print(f"wrote {out} ({len(events)} events)")
    return 0


def admin_drain(admin: Any, args: argparse.Namespace) -> int:
    from pipeserve.v1 import pipeserve_pb2 as pb

    admin.DrainWorker(pb.DrainWorkerRequest(worker_id=args.target))
    print(f"draining {args.target}")
    return 0


ACTIONS = {
    "load": admin_load,
    "unload": admin_unload,
    "plan": admin_plan,
    "status": admin_status,
    "drain": admin_drain,
    "timeline": admin_timeline,
}


def cmd_admin(args: argparse.Namespace) -> int:
    import grpc

    apply_tls(args)
    admin, _ = stubs(args.coordinator)
    try:
        return ACTIONS[args.action](admin, args)
    except grpc.RpcError as e:
        return report_rpc_error(e)


def add_admin_command(sub: Any) -> None:
    p = sub.add_parser("admin", help="load/unload/plan models, cluster status, drain")
    p.add_argument("action", choices=list(ACTIONS))
    p.add_argument("target", nargs="?", default="", help="checkpoint, model or worker id")
    p.add_argument("--coordinator", default="127.0.0.1:50051", metavar="HOST:PORT")
    p.add_argument("--name", help="model name (load; default: the directory name)")
    add_policy_flags(p, "N stages balanced by time (the default; 0: one per idle worker)")
    add_workload_flags(p, "(0: the workers' --max-kv-tokens, for generation)")
    p.add_argument("--dtype", default="", help=DTYPE_HELP)
    p.add_argument("--device", help="cpu or cuda (default: each worker's own)")
    p.add_argument(
        "--mode", choices=["generate", "forward"], help="default: generate if the model can"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--seconds", type=float, default=5.0, help="timeline: the last N seconds")
    p.add_argument(
        "--watch", type=float, default=0, metavar="S", help="status: refresh every S seconds"
    )
    add_tls_flags(p)
    p.add_argument("-o", "--output", default="timeline.png", help="timeline: PNG to write")
    p.set_defaults(func=cmd_admin)
