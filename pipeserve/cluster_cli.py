"""``pipeserve coordinator | worker | admin | generate``: the cluster's command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

__all__ = ["add_commands"]


def _stubs(address: str) -> Any:
    from pipeserve import rpc
    from pipeserve.v1 import pipeserve_pb2_grpc as pbg

    ch = rpc.channel(address)  # admin and client calls carry their tokens when set
    admin_ch = rpc.with_token(ch, os.environ.get("PIPESERVE_ADMIN_TOKEN", ""))
    client_ch = rpc.with_token(ch, os.environ.get("PIPESERVE_CLIENT_TOKEN", ""))
    return pbg.AdminStub(admin_ch), pbg.InferenceStub(client_ch)


def _rpc_error(e: Any) -> int:
    print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
    return 2


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig
    from coordinator.registry import default_host
    from coordinator.server import serve
    from pipeserve.observe import setup_logging

    setup_logging(os.environ.get("PIPESERVE_LOG", "INFO"), args.log_format)
    _apply_tls(args)
    config = CoordinatorConfig.from_env(
        host=default_host(args.host, bool(args.tls_ca or os.environ.get("PIPESERVE_TLS_CA"))),
        port=args.port,
        advertise_host=args.advertise_host,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        model_roots=args.model_root or [],
        worker_timeout=args.worker_timeout,
        state_db=args.state_db,
        max_streams_per_client=args.max_streams_per_client,
    )
    serve(config, stop=_stop_on_sigterm())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import torch

    from pipeline_core import EngineLimits
    from pipeline_core.split import parse_size
    from pipeserve.observe import setup_logging
    from stage_worker.server import serve

    setup_logging(os.environ.get("PIPESERVE_LOG", "INFO"), args.log_format)
    _apply_tls(args)
    if args.threads:  # else torch takes every core of the node, whatever the pod's CPU limit
        torch.set_num_threads(args.threads)
    serve(
        args.coordinator,
        stop=_stop_on_sigterm(),
        leave_on_stop=True,
        worker_id=args.worker_id,
        host=args.host,
        port=args.port,
        device=args.device,
        advertise_host=args.advertise_host,
        limits=EngineLimits(max_tokens=args.max_kv_tokens, max_sequences=args.max_sequences),
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        speed_gflops=args.speed,
        memory_bytes=parse_size(args.memory) if args.memory else 0,
    )
    # [Note: exiting a worker] its stage has moved away (or was given up); threads of the
    # abandoned stage may still block on the dead data plane until PIPESERVE_DATAPLANE_TIMEOUT,
    # and gloo aborts the process if they are torn down at interpreter exit: leave now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stop_on_sigterm() -> threading.Event:
    """An event SIGTERM sets (``docker stop``, Kubernetes): the server stops taking work,
    a worker moves its stage to a spare, and the process exits."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:  # set off the signal handler's frame
        threading.Thread(target=stop.set, name="sigterm").start()

    signal.signal(signal.SIGTERM, handler)
    return stop


def _policy_proto(args: argparse.Namespace) -> Any:
    from pipeline_core.split import parse_size
    from pipeserve.v1 import pipeserve_pb2 as pb

    if args.threshold:
        return pb.SplitPolicy(threshold_bytes=parse_size(args.threshold))
    if args.split_at:
        return pb.SplitPolicy(manual=pb.ManualSplit(split_at=args.split_at.split(",")))
    if args.equal_size:
        return pb.SplitPolicy(equal_size=args.equal_size)
    return pb.SplitPolicy(balanced=args.balanced or 0)  # default: by time, one per idle worker


def _workload_proto(args: argparse.Namespace) -> Any:
    from pipeserve.v1 import pipeserve_pb2 as pb

    return pb.Workload(batch=args.batch, seq=args.seq, chunks=args.chunks, kv_tokens=args.kv_tokens)


def add_workload_flags(p: argparse.ArgumentParser, kv_default: str) -> None:
    """``--batch --seq --chunks --kv-tokens``: the workload plan times are estimated for
    (``pipeline_core.cost.Workload``'s defaults)."""
    p.add_argument("--batch", type=int, default=8, help="workload for times: rows per batch")
    p.add_argument("--seq", type=int, default=128, help="workload for times: tokens per row")
    p.add_argument("--chunks", type=int, default=4, help="workload for times: microbatches")
    p.add_argument(
        "--kv-tokens", type=int, default=0, help=f"KV tokens each stage must hold {kv_default}"
    )


def _bar(done: int, total: int, width: int = 24) -> str:
    frac = done / total if total else 0.0
    n = int(frac * width)
    return "[" + "#" * n + "." * (width - n) + f"] {frac:6.1%}"


def cmd_admin(args: argparse.Namespace) -> int:
    import grpc

    from pipeserve.cli import _human
    from pipeserve.v1 import pipeserve_pb2 as pb

    _apply_tls(args)
    admin, _ = _stubs(args.coordinator)
    try:
        if args.action == "load":
            req = pb.LoadModelRequest(
                name=args.name or "",
                checkpoint=args.target,
                policy=_policy_proto(args),
                dtype=args.dtype,
                device=args.device or "",
                mode=args.mode or "",
                workload=_workload_proto(args),
            )
            last = None
            tty = sys.stdout.isatty()
            for p in admin.LoadModel(req):
                last = p
                lines = [
                    f"stage {s.stage} {s.worker_id:>4} {_bar(s.bytes_loaded, s.bytes_total)} "
                    f"{_human(s.bytes_loaded):>10} / {_human(s.bytes_total):<10} {s.state}"
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
        elif args.action == "unload":
            admin.UnloadModel(pb.UnloadModelRequest(name=args.target))
            print(f"unloaded {args.target}")
        elif args.action == "plan":
            r = admin.PlanModel(
                pb.PlanModelRequest(
                    checkpoint=args.target,
                    policy=_policy_proto(args),
                    dtype=args.dtype,
                    workload=_workload_proto(args),
                )
            )
            if args.json:
                print(r.plan_json)
            else:
                print(
                    f"{'stage':>5}  {'worker':>10}  {'bytes':>12}  {'KV/token':>9}  "
                    f"{'est. ms':>8}  {'compute':>7}  units"
                )
                for s in r.stages:
                    u = list(s.units)
                    shown = u if len(u) <= 4 else [*u[:2], "...", u[-1]]
                    print(
                        f"{s.stage:>5}  {s.worker_id or '-':>10}  {_human(s.bytes):>12}  "
                        f"{_human(s.kv_bytes_per_token):>9}  {1e3 * s.seconds:>8.1f}  "
                        f"{s.compute_fraction:>7.1%}  {', '.join(shown)} ({len(u)})"
                    )
                if r.times_from:
                    print(
                        f"\npredicted ({args.chunks} microbatches of {args.batch} x {args.seq}, "
                        f"times from {r.times_from}): {r.samples_per_s:.2f} samples/s per batch, "
                        f"bubble {r.bubble:.0%}; streamed {r.streaming_samples_per_s:.2f} "
                        "samples/s"
                    )
        elif args.action == "status":
            while True:
                r = admin.ClusterStatus(pb.ClusterStatusRequest())
                if args.json:
                    from google.protobuf.json_format import MessageToDict

                    print(json.dumps(MessageToDict(r)))
                    return 0
                if args.watch:
                    print("\x1b[2J\x1b[H", end="")  # clear the screen: a live table
                _print_status(r, _human, pb)
                if not args.watch:
                    break
                time.sleep(args.watch)
        elif args.action == "timeline":
            from pipeserve.timeline_plot import render_timeline, summarize

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
        elif args.action == "drain":
            admin.DrainWorker(pb.DrainWorkerRequest(worker_id=args.target))
            print(f"draining {args.target}")
    except grpc.RpcError as e:
        return _rpc_error(e)
    return 0


def _print_status(r: Any, _human: Any, pb: Any) -> None:
    print(
        f"{'worker':<9} {'address':<22} {'device':<7} {'GFLOP/s':>8} {'memory':>10} "
        f"{'state':<9} {'model':<16} {'stage':>5} {'kv seqs':>7} {'kv bytes':>10} "
        f"{'heartbeat':>9}"
    )
    for w in r.workers:
        print(
            f"{w.id:<9} {w.address:<22} {w.device:<7} {w.speed_gflops:>8.0f} "
            f"{_human(w.memory_bytes):>10} {w.state:<9} {w.model or '-':<16} "
            f"{w.stage if w.model else '-':>5} {w.kv_sequences:>7} "
            f"{_human(w.kv_bytes):>10} {w.seconds_since_heartbeat:>8.1f}s"
        )
    print()
    print(f"{'model':<16} {'state':<8} {'dtype':<9} {'stages':>6} {'epoch':>5}  checkpoint")
    for m in r.models:
        state = pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_")
        print(
            f"{m.name:<16} {state:<8} {m.dtype:<9} {m.num_stages:>6} {m.epoch:>5}  {m.checkpoint}"
        )


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from pipeserve.v1 import pipeserve_pb2 as pb

    _apply_tls(args)
    _, inference = _stubs(args.coordinator)
    if (args.prompt is None) == (args.prompt_ids is None):
        raise SystemExit("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    req = pb.GenerateRequest(model=args.model, max_new_tokens=args.max_new_tokens)
    if args.prompt is not None:
        req.text = args.prompt
    else:
        req.token_ids.ids.extend(int(x) for x in args.prompt_ids.split(",") if x.strip())
    s = req.sampling
    s.temperature, s.top_k, s.top_p = args.temperature, args.top_k, args.top_p
    s.repetition_penalty = args.repetition_penalty
    if args.seed is not None:
        s.seed = args.seed
    ids: list[int] = []
    text = ""
    t0 = time.perf_counter()
    try:
        for r in inference.Generate(req, timeout=args.timeout):
            ids += list(r.token_ids)
            text += r.text
            if not args.json:
                print(
                    r.text if r.text else " ".join(map(str, r.token_ids)) + " ", end="", flush=True
                )
            if r.finish_reason:
                finish, usage = pb.FinishReason.Name(r.finish_reason), r.usage
    except grpc.RpcError as e:
        if not args.json:
            print()
        return _rpc_error(e)
    if args.json:
        print(
            json.dumps(
                {
                    "token_ids": ids,
                    "text": text,
                    "finish_reason": finish.removeprefix("FINISH_REASON_").lower(),
                    "usage": {
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                    },
                    "seconds": time.perf_counter() - t0,
                }
            )
        )
    else:
        print()
    return 0


def _tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-ca",
        help="CA certificate: verify peers; a server requires client "
        "certificates (mTLS). Env: PIPESERVE_TLS_CA",
    )
    p.add_argument("--tls-cert", help="this process's certificate. Env: PIPESERVE_TLS_CERT")
    p.add_argument("--tls-key", help="its private key. Env: PIPESERVE_TLS_KEY")


def _apply_tls(args: argparse.Namespace) -> None:
    from pipeserve import rpc

    env = rpc.TLS.from_env()
    rpc.configure_tls(
        rpc.TLS(
            ca=args.tls_ca or env.ca, cert=args.tls_cert or env.cert, key=args.tls_key or env.key
        )
    )


def cmd_certs(args: argparse.Namespace) -> int:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        print(
            "error: pipeserve certs needs the [tls] extra (the cryptography package): "
            "pip install 'pipeserve[tls]', or use openssl / your PKI",
            file=sys.stderr,
        )
        return 2
    from pipeserve.certs import make_certs

    hosts = [h for h in (args.hosts or "").split(",") if h]
    out = make_certs(args.out, hosts)
    print(f"wrote {out}/ca.pem, server.pem/.key (servers), client.pem/.key (clients)")
    return 0


def _observability_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics (0: off)")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument(
        "--health-port",
        type=int,
        default=0,
        help="also serve plaintext grpc.health.v1 here (for Kubernetes probes under TLS)",
    )
    _tls_flags(p)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("coordinator", help="run the coordinator (gRPC)")
    p.add_argument(
        "--host",
        help="address to bind (default 0.0.0.0 when PIPESERVE_WORKER_TOKEN or mutual TLS "
        "guards registration, else 127.0.0.1)",
    )
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--advertise-host", help="host name this coordinator reports")
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=5.0,
        help="seconds without a heartbeat before a worker is lost and its stage moves to a spare",
    )
    p.add_argument(
        "--max-streams-per-client",
        type=int,
        default=0,
        help="generations one client address may have in flight, by pipeserve.v1 or KServe "
        "(0: no limit); an HTTP gateway is one client: size it for the gateway's users",
    )
    p.add_argument(
        "--state-db",
        default="",
        help="SQLite file for deployments: a restarted coordinator restores its models",
    )
    p.add_argument(
        "--model-root",
        action="append",
        metavar="DIR",
        help="checkpoints must lie under this directory (repeatable; default: anywhere)",
    )
    _observability_flags(p)
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("worker", help="run a stage worker (gRPC)")
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--advertise-host", help="host the coordinator uses to reach this worker")
    p.add_argument("--max-kv-tokens", type=int, default=65536, help="stage 0: KV budget in tokens")
    p.add_argument("--max-sequences", type=int, default=256, help="stage 0: sequences at once")
    p.add_argument(
        "--speed", type=float, default=0.0, help="GFLOP/s to report (default: measured at start)"
    )
    p.add_argument("--memory", help="memory to offer stages, e.g. 20GiB (default: the device's)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default, every core; set it to the CPU limit)",
    )
    p.add_argument(
        "--worker-id",
        default="",
        help="id to register under, e.g. a StatefulSet pod name (default: one is given)",
    )
    _observability_flags(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("admin", help="load/unload/plan models, cluster status, drain")
    p.add_argument("action", choices=["load", "unload", "plan", "status", "drain", "timeline"])
    p.add_argument("target", nargs="?", default="", help="checkpoint, model or worker id")
    p.add_argument("--coordinator", default="127.0.0.1:50051", metavar="HOST:PORT")
    p.add_argument("--name", help="model name (load; default: the directory name)")
    p.add_argument("--equal-size", type=int, metavar="N")
    p.add_argument("--threshold", metavar="SIZE")
    p.add_argument("--split-at", metavar="A,B")
    p.add_argument(
        "--stages",
        "--balanced",
        dest="balanced",
        type=int,
        metavar="N",
        help="N stages balanced by time (the default; 0: one per idle worker)",
    )
    add_workload_flags(p, "(0: the workers' --max-kv-tokens, for generation)")
    p.add_argument(
        "--dtype",
        default="",
        help="float32, bfloat16, float16 (default: the checkpoint's, as from_pretrained)",
    )
    p.add_argument("--device", help="cpu or cuda (default: each worker's own)")
    p.add_argument(
        "--mode", choices=["generate", "forward"], help="default: generate if the model can"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--seconds", type=float, default=5.0, help="timeline: the last N seconds")
    p.add_argument(
        "--watch", type=float, default=0, metavar="S", help="status: refresh every S seconds"
    )
    _tls_flags(p)
    p.add_argument("-o", "--output", default="timeline.png", help="timeline: PNG to write")
    p.set_defaults(func=cmd_admin)

    p = sub.add_parser("generate", help="generate through the coordinator (client)")
    p.add_argument("--coordinator", default="127.0.0.1:50051", metavar="HOST:PORT")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt")
    p.add_argument("--prompt-ids", metavar="1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    p.add_argument("--json", action="store_true")
    _tls_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("certs", help="make development TLS certificates (CA, server, client)")
    p.add_argument("--out", default="certs")
    p.add_argument("--hosts", help="extra host names / IPs for the server certificate")
    p.set_defaults(func=cmd_certs)
