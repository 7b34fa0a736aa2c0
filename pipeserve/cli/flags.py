"""The flags several commands share, each written once, with their defaults taken from the
domain objects they fill (``Policy``, ``Workload``, ``SamplingParams``, ``TLS``), and the
functions that turn parsed flags back into those objects."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from pipeline_core import Policy, SamplingParams, Workload
from pipeline_core.compiled_step import CompileSettings
from pipeline_core.stage_options import StageOptions
from pipeserve.tls import TLS, configure_tls

__all__ = [
    "COMPILE_DECODE_ENV",
    "CUDA_IPC_ENV",
    "DECODE_AHEAD_ENV",
    "DTYPE_HELP",
    "STEP_TIMING_ENV",
    "add_observability_flags",
    "add_policy_flags",
    "add_sampling_flags",
    "add_tls_flags",
    "add_workload_flags",
    "apply_tls",
    "log_level",
    "parse_ids",
    "policy_from_args",
    "sampling_from_args",
    "stage_options_from_env",
    "workload_from_args",
]

DTYPE_HELP = "float32, bfloat16, float16 (default: the checkpoint's, as from_pretrained)"


def add_policy_flags(p: argparse.ArgumentParser, stages_help: str, workers: bool = False) -> None:
    """``--stages/--balanced N | --equal-size N | --threshold SIZE | --split-at A,B``, and
    with ``workers`` also ``--markers --stage-memory --stage-speed`` (local planning)."""
    p.add_argument(
        "--stages", "--balanced", dest="balanced", type=int, metavar="N", help=stages_help
    )
    p.add_argument("--equal-size", type=int, metavar="N", help="N stages of balanced bytes")
    p.add_argument("--threshold", metavar="SIZE", help="new stage past SIZE (e.g. 500MB)")
    p.add_argument("--split-at", metavar="A,B", help="begin stages at these modules")
    if workers:
        p.add_argument("--markers", action="store_true", help="split at pipe_split() calls")
        p.add_argument(
            "--stage-memory",
            metavar="M1,M2",
            help="with --stages: memory of each worker (8GiB,..)",
        )
        p.add_argument(
            "--stage-speed", metavar="S1,S2", help="with --stages: relative speed of each worker"
        )
    else:
        p.set_defaults(markers=False, stage_memory=None, stage_speed=None)


def policy_from_args(args: argparse.Namespace, default_stages: int) -> Policy:
    """The one policy the flags choose (two: exit with a message); none: ``balanced`` over
    ``default_stages`` (0: one stage per idle worker, the coordinator's to count)."""
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
    if args.equal_size is not None:
        return Policy.equal_size(args.equal_size)
    if args.balanced is None:
        return Policy.balanced(default_stages)
    memory = args.stage_memory.split(",") if args.stage_memory else None
    speeds = [float(s) for s in args.stage_speed.split(",")] if args.stage_speed else None
    return Policy.balanced(args.balanced, memory=memory, speeds=speeds)


def add_workload_flags(p: argparse.ArgumentParser, kv_help: str, device: bool = False) -> None:
    """``--batch --seq --chunks --kv-tokens`` (and with ``device``: ``--device --threads
    --no-profile``): the workload plan times are estimated for, defaults ``Workload``'s."""
    d = Workload()
    p.add_argument("--batch", type=int, default=d.batch, help="workload for times: rows per batch")
    p.add_argument("--seq", type=int, default=d.seq, help="workload for times: tokens per row")
    p.add_argument("--chunks", type=int, default=d.chunks, help="workload for times: microbatches")
    p.add_argument(
        "--kv-tokens",
        type=int,
        default=d.kv_tokens,
        help=f"KV tokens each stage must hold {kv_help}",
    )
    if device:
        p.add_argument("--device", default=d.device, help="device to profile units on (cpu, cuda)")
        p.add_argument(
            "--threads", type=int, default=d.threads, help="threads per stage while profiling"
        )
        p.add_argument(
            "--no-profile", action="store_true", help="estimate times from FLOPs, run nothing"
        )


def workload_from_args(args: argparse.Namespace) -> Workload:
    d = Workload()
    return Workload(
        batch=args.batch,
        seq=args.seq,
        chunks=args.chunks,
        kv_tokens=args.kv_tokens,
        device=getattr(args, "device", None) or d.device,
        threads=getattr(args, "threads", d.threads),
        profile=not getattr(args, "no_profile", False),
    )


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """``--max-new-tokens --temperature --top-k --top-p --repetition-penalty --seed``, with
    ``SamplingParams``' defaults."""
    d = SamplingParams()
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0: no limit")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, help="1: none")
    p.add_argument("--seed", type=int, default=d.seed)


def parse_ids(text: str) -> list[int]:
    """``--prompt-ids 1,2,3`` as a list of token ids."""
    return [int(x) for x in text.split(",") if x.strip()]


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-ca",
        help="CA certificate: verify peers; a server requires client "
        "certificates (mTLS). Env: PIPESERVE_TLS_CA",
    )
    p.add_argument("--tls-cert", help="this process's certificate. Env: PIPESERVE_TLS_CERT")
    p.add_argument("--tls-key", help="its private key. Env: PIPESERVE_TLS_KEY")


def apply_tls(args: argparse.Namespace) -> TLS:
    """This process's TLS from the flags, else ``PIPESERVE_TLS_*`` (set and returned)."""
    env = TLS.from_env()
    tls = TLS(ca=args.tls_ca or env.ca, cert=args.tls_cert or env.cert, key=args.tls_key or env.key)
    configure_tls(tls)
    return tls


def add_observability_flags(p: argparse.ArgumentParser) -> None:
    """``--metrics-port --log-format --health-port`` and the TLS flags (servers)."""
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics (0: off)")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument(
        "--health-port",
        type=int,
        default=0,
        help="also serve plaintext grpc.health.v1 here (for Kubernetes probes under TLS)",
    )
    add_tls_flags(p)


def log_level(default: str) -> str:
    """``PIPESERVE_LOG``, else ``default`` (servers: INFO; one-shot commands: WARNING)."""
    return os.environ.get("PIPESERVE_LOG", default)


STEP_TIMING_ENV = "PIPESERVE_STEP_TIMING"
CUDA_IPC_ENV = "PIPESERVE_CUDA_IPC"
COMPILE_DECODE_ENV = "PIPESERVE_COMPILE_DECODE"
DECODE_AHEAD_ENV = "PIPESERVE_DECODE_AHEAD"
HUGE_PAGES_ENV = "PIPESERVE_HUGE_PAGES"


def stage_options_from_env(env: Mapping[str, str] | None = None) -> StageOptions:
    """Generation stage options from ``PIPESERVE_STEP_TIMING`` (``1``: keep the per-step time
    breakdown; default off) and ``PIPESERVE_CUDA_IPC`` (``0``: no CUDA IPC between two stages
    sharing a GPU; default on) and ``PIPESERVE_COMPILE_DECODE`` (``N``: compile the decode
    steps of ``N`` rows or more, ``1`` all of them; default off) and ``PIPESERVE_DECODE_AHEAD``
    (``0``: later stages wait for each decode step before starting it; default on) and
    ``PIPESERVE_HUGE_PAGES`` (``0``: a stage's CPU weights in ordinary pages; default on)."""
    env = os.environ if env is None else env
    timing = env.get(STEP_TIMING_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return StageOptions(
        step_timing=timing,
        cuda_ipc=env.get(CUDA_IPC_ENV, "1").strip() != "0",
        compile_decode=compile_settings(env.get(COMPILE_DECODE_ENV, "")),
        decode_ahead=env.get(DECODE_AHEAD_ENV, "1").strip() != "0",
        huge_pages=env.get(HUGE_PAGES_ENV, "1").strip() != "0",
    )


def compile_settings(value: str) -> CompileSettings | None:
    """``PIPESERVE_COMPILE_DECODE``'s value as settings: a row count ``N >= 1`` (compile decode
    steps of at least ``N`` rows; ``on``/``true``/``yes`` mean 1), ``0``/empty/``off``: None."""
    v = value.strip().lower()
    if v in ("", "0", "off", "false", "no"):
        return None
    if v in ("on", "true", "yes"):
        return CompileSettings()
    try:
        rows = int(v)
    except ValueError:
        raise ValueError(
            f"{COMPILE_DECODE_ENV}={value!r}: expected a row count (1: compile every decode "
            "step, N: steps of N rows or more) or 0/off"
        ) from None
    if rows < 0:
        raise ValueError(f"{COMPILE_DECODE_ENV}={value!r}: a row count cannot be negative")
    return CompileSettings(min_rows=rows) if rows else None
