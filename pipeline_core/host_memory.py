"""Refuse before reading a byte: do a plan's stages fit the memory this host has left?

[Note: why check before loading]
``pipeserve run`` and ``pipeserve local`` start every stage on this host.  A plan that does not
fit used to be found out by the kernel's OOM killer half-way through loading (a Bloom-7b1 bf16
checkpoint planned in float32: 30.2 GiB on a 24 GiB host), killing one stage process and leaving
the others waiting.  The plan knows each stage's bytes and KV bytes per token before anything is
read, and the host knows what it has left (``MemAvailable``, or the cgroup's limit minus its
usage when that is smaller), so the answer is known up front.  A cluster refuses per worker at
planning instead (each worker reports its memory).
"""

from __future__ import annotations

from pathlib import Path

from .errors import DoesNotFit
from .plan import Plan
from .split import _human

__all__ = ["RUNTIME_BASELINE", "available_memory", "check_host_fits", "host_need"]

RUNTIME_BASELINE = 400 * 2**20
"""Resident memory of one stage process before its weights (Python, torch, transformers):
measured 330-370 MiB on CPU."""


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> tuple[int, str] | None:
    """Bytes this host can still give new processes, and where the figure comes from
    (``MemAvailable`` or the cgroup limit); None when neither can be read."""
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "available RAM"))
    except (OSError, ValueError, IndexError):
        pass
    cg = Path("/sys/fs/cgroup")
    for limit_file, usage_file in (
        (cg / "memory.max", cg / "memory.current"),  # cgroup v2
        (cg / "memory" / "memory.limit_in_bytes", cg / "memory" / "memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            found.append((max(0, limit - usage), "left under the cgroup memory limit"))
            break
    return min(found) if found else None


def host_need(plan: Plan, kv_tokens: int, processes: int | None = None) -> dict[str, int]:
    """Bytes the plan's stages take on one host: weights (tied tensors loaded by two stages
    count twice), KV cache for ``kv_tokens`` tokens on every stage, and a runtime baseline per
    process (default: one per stage)."""
    weights = sum(s.nbytes for s in plan.stages)
    kv = sum(s.kv_bytes_per_token for s in plan.stages) * kv_tokens
    runtime = RUNTIME_BASELINE * (processes if processes is not None else plan.num_stages)
    return {"weights": weights, "kv": kv, "runtime": runtime, "total": weights + kv + runtime}


def check_host_fits(plan: Plan, kv_tokens: int, processes: int | None = None) -> None:
    """Raise :class:`DoesNotFit` (one line: what is needed, what is missing, what to do) when
    the plan's stages cannot all live on this host."""
    have = available_memory()
    if have is None:
        return
    avail, where = have
    need = host_need(plan, kv_tokens, processes)
    if need["total"] <= avail:
        return
    raise DoesNotFit(
        f"the {plan.num_stages} stages need {_human(need['total'])} on this host (weights "
        f"{_human(need['weights'])} in {plan.dtype} + KV cache {_human(need['kv'])} for "
        f"{kv_tokens} tokens + runtime {_human(need['runtime'])}) but it has "
        f"{_human(avail)} {where}: {_human(need['total'] - avail)} missing; free memory, use "
        "a smaller --dtype, or spread the stages over hosts (pipeserve worker)"
    )
