"""The benchmarks' shared harness: machine and code identity, process memory and CPU figures
from ``/proc``, a free port, a child-process runner, and JSON conversion.

Every benchmark module imports these from here (public names; nothing here runs a benchmark).

[Note: peak RSS of spawned processes]
``ru_maxrss`` of a process started by ``subprocess`` or ``multiprocessing`` "spawn" is *not*
its own peak on Linux: Python starts children with vfork + exec, and exec folds the parent's
high-water mark into the child's ``ru_maxrss``.  A child of a 1 GiB parent reports >= 1 GiB.
So every peak here is ``VmHWM`` from ``/proc/<pid>/status`` (the peak of the process's own
address space), which ``/proc/self/clear_refs`` can also reset to the current RSS.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MiB = 2**20
GiB = 2**30


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(val.split()[0]) * 1024
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> dict[str, float]:
    """User and system CPU seconds and minor page faults of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # after the command name: state(3) ... minflt(10) cminflt majflt cmajflt utime(14) stime(15)
    return {
        "utime_s": int(fields[11]) / _TICK,
        "stime_s": int(fields[12]) / _TICK,
        "minflt": int(fields[7]),
    }


def ru_maxrss() -> int:
    """``ru_maxrss`` in bytes (inherits the parent's peak in spawned children; see module note)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_detail() -> str:
    """Family/model, torch's vector ISA and the L3 size: VMs often name every CPU generation
    alike ("AMD EPYC"), and results from two generations must not read as one machine's."""
    from pipeline_core.cost import cpu_fields

    fields = cpu_fields()
    parts = []
    if "cpu family" in fields and "model" in fields:
        parts.append(f"family {fields['cpu family']} model {fields['model']}")
    parts.append(torch.backends.cpu.get_cpu_capability())
    try:
        l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        parts.append(f"L3 {l3}")
    except OSError:
        pass
    return ", ".join(parts)


def machine() -> dict[str, Any]:
    import transformers

    from pipeline_core.cost import cpu_name

    cpu = cpu_name()
    return {
        "cpu": f"{cpu} ({cpu_detail()})",
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def code_state() -> dict[str, Any]:
    """The commit and any uncommitted changes of ``pipeline_core`` (what was measured)."""
    import hashlib

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.rstrip("\n")
        except OSError:
            return ""

    status = git("status", "--porcelain", "pipeline_core")
    digest = hashlib.sha256()
    for f in sorted((ROOT / "pipeline_core").rglob("*.py")):
        digest.update(f.read_bytes())
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": [ln[3:] for ln in status.splitlines()],
        "sha256": digest.hexdigest(),
    }


def spawn_and_get(target: Any, args: tuple, timeout: float = 300) -> Any:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    try:
        return q.get(timeout=timeout)
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def write_results(
    out: Path, stem: str, res: dict[str, Any], markdown: Callable[[dict[str, Any]], str]
) -> str:
    """``out/<stem>.json`` (``res`` made JSON-safe) and ``out/<stem>.md`` (``markdown`` of what
    the JSON file reads back as, the same input a ``--report-only`` run gets); the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(jsonable(res), indent=2) + "\n"
    (out / f"{stem}.json").write_text(text)
    md = markdown(json.loads(text))
    (out / f"{stem}.md").write_text(md)
    return md
