"""Split policies: pure functions from ordered unit sizes (bytes) to stage boundaries.

A split is the list of unit indices where each stage starts (the first is always 0), so
``[0, 5, 9]`` means stages ``units[0:5]``, ``units[5:9]``, ``units[9:]``.

* :func:`equal_size` -- n contiguous stages minimizing the largest stage's bytes, exactly
  (binary search on the answer with a greedy feasibility check, then the lexicographically
  balanced boundaries). PiPPy used a greedy guess over parameter counts.
* :func:`threshold` -- start a new stage whenever the next unit would pass the limit.
* :func:`manual` -- split before the named modules.
* :func:`balanced` -- n stages minimizing the slowest stage's *time* (unit seconds from
  :mod:`.cost` / worker speed) while every stage fits its worker's memory (weights + KV
  cache); :func:`balanced_order` also picks which worker takes which stage.  ``equal_size``
  balances bytes, which is right for memory and wrong for speed: an embedding is big and
  nearly free, an output layer is big and expensive.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from .errors import DoesNotFit, PlanError

__all__ = [
    "balanced",
    "balanced_order",
    "equal_size",
    "manual",
    "parse_size",
    "slowest",
    "stage_sizes",
    "threshold",
]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int | float) -> int:
    """``"500MB"`` -> 500_000_000, ``"1.5GiB"`` -> 1610612736, ``1024`` -> 1024."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
        if not m or m.group(2).upper() not in _UNITS:
            raise PlanError(
                f"cannot read size {text!r}: use a number of bytes or e.g. '500MB', '1.5GiB'"
            )
        value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise PlanError(f"size must be positive, got {text!r}")
    return int(value)


def stage_sizes(sizes: Sequence[int], starts: Sequence[int]) -> list[int]:
    ends = [*starts[1:], len(sizes)]
    return [sum(sizes[a:b]) for a, b in zip(starts, ends, strict=True)]


def _greedy_starts(sizes: Sequence[int], cap: int) -> list[int] | None:
    """Fewest stages with every stage <= cap, filling each stage as far as it goes."""
    starts, acc = [0], 0
    for i, s in enumerate(sizes):
        if s > cap:
            return None
        if acc + s > cap and i > 0 and acc > 0:
            starts.append(i)
            acc = 0
        acc += s
    return starts


def equal_size(sizes: Sequence[int], n: int, names: Sequence[str] | None = None) -> list[int]:
    """Split ``sizes`` into exactly ``n`` contiguous non-empty stages minimizing the largest.

    Raises:
        PlanError: ``n`` < 1 or more stages than units.
    """
    if n < 1:
        raise PlanError(f"number of stages must be at least 1, got {n}")
    if n > len(sizes):
        raise PlanError(
            f"cannot make {n} stages from {len(sizes)} units"
            + (f" ({', '.join(names)})" if names and len(names) <= 12 else "")
            + f"; use at most {len(sizes)} stages"
        )
    if any(s < 0 for s in sizes):
        raise PlanError("unit sizes must not be negative")
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:  # smallest cap that fits in n stages
        mid = (lo + hi) // 2
        starts = _greedy_starts(sizes, mid)
        if starts is not None and len(starts) <= n:
            hi = mid
        else:
            lo = mid + 1
    return _exactly_n(sizes, n, lo)


def _exactly_n(sizes: Sequence[int], n: int, cap: int) -> list[int]:
    """Boundaries for exactly ``n`` non-empty stages, each <= cap.

    Stages are filled greedily from the back while leaving at least one unit per remaining
    stage, so when ``cap`` allows fewer stages the surplus splits off single units.
    """
    ends: list[int] = []
    end = len(sizes)
    for remaining in range(n, 1, -1):
        acc, start = 0, end
        while start - 1 >= remaining - 1 and acc + sizes[start - 1] <= cap:
            start -= 1
            acc += sizes[start]
            if start == remaining - 1:
                break
        if start == end:  # nothing fit: take one unit (only possible when cap < max)
            start = end - 1
        ends.append(start)
        end = start
    return [0, *reversed(ends)]


def threshold(sizes: Sequence[int], limit: int, names: Sequence[str]) -> list[int]:
    """A new stage whenever the next unit would pass ``limit`` bytes.

    Raises:
        PlanError: ``limit`` is not positive, or one unit alone is larger than ``limit``.
    """
    if limit <= 0:
        raise PlanError(f"threshold must be a positive number of bytes, got {limit}")
    for name, s in zip(names, sizes, strict=True):
        if s > limit:
            raise PlanError(
                f"unit {name!r} is {s} bytes ({_human(s)}), larger than the threshold "
                f"{limit} bytes ({_human(limit)}); raise the threshold to at least {_human(s)}"
            )
    starts = _greedy_starts(sizes, limit)
    assert starts is not None
    return starts


def manual(names: Sequence[str], split_at: Sequence[str]) -> list[int]:
    """Stages begin at the named units (module FQNs), e.g. ``["model.layers.4"]``."""
    index = {n: i for i, n in enumerate(names)}
    starts = [0]
    for point in split_at:
        if point not in index:
            close = [n for n in names if point.split(".")[-1] in n.split(".")][:5] or names[:5]
            raise PlanError(
                f"unknown split point {point!r}: it is not a unit of this model. Units look "
                f"like {', '.join(close)} (see `pipeserve plan MODEL --units`)"
            )
        i = index[point]
        if i == 0:
            raise PlanError(f"split point {point!r} is the first unit; a stage cannot be empty")
        if i <= starts[-1]:
            raise PlanError(
                f"split points must be in model order without repeats; {point!r} comes "
                f"before or at {names[starts[-1]]!r}"
            )
        starts.append(i)
    return starts


def balanced(
    costs: Sequence[float],
    sizes: Sequence[int],
    n: int,
    names: Sequence[str],
    *,
    memory: Sequence[int] | None = None,
    speeds: Sequence[float] | None = None,
) -> list[int]:
    """Contiguous stages minimizing ``max_k cost_k / speeds[k]`` with ``bytes_k <= memory[k]``.

    Stage ``k`` runs on worker ``k``.  Binary search on the slowest stage's time with an exact
    feasibility check (a greedy fill is not exact once every worker must take a unit: a slow
    worker may best take a cheap unit in the middle).  Returns exactly ``n`` stages.

    Raises:
        PlanError: bad arguments, a unit larger than every worker, or too little memory in
            total (the message says how much is missing).
    """
    if n < 1 or n > len(costs):
        equal_size(sizes, n, names)  # raises the same clear errors
    speeds = list(speeds or [1.0] * n)
    memory = list(memory or [])
    if len(speeds) != n or (memory and len(memory) != n):
        raise PlanError(f"give one speed and one memory size per stage ({n} stages)")
    if any(s <= 0 for s in speeds) or any(m <= 0 for m in memory):
        raise PlanError("worker speeds and memory sizes must be positive")
    caps = memory or [sum(sizes)] * n
    need, have = sum(sizes), sum(caps)
    if need > have:
        raise DoesNotFit(
            f"the model needs {_human(need)} but the {n} workers hold {_human(have)} in total: "
            f"{_human(need - have)} missing; add workers or memory, or use a smaller dtype"
        )
    for name, s in zip(names, sizes, strict=True):
        if s > max(caps):
            raise DoesNotFit(
                f"unit {name!r} ({_human(s)}) is larger than any worker's memory "
                f"({_human(max(caps))})"
            )

    cost_at = list(itertools.accumulate(costs, initial=0.0))
    size_at = list(itertools.accumulate(sizes, initial=0))
    m = len(costs)

    def fits(k: int, a: int, b: int, limit: float) -> bool:  # units[a:b] on worker k
        t = cost_at[b] - cost_at[a]
        return t <= limit * speeds[k] * (1 + 1e-12) and size_at[b] - size_at[a] <= caps[k]

    def fill(limit: float) -> list[int] | None:
        """Exactly ``n`` non-empty stages within ``limit``, if any (exact, O(n * m)).

        ``reach[k][i]``: units ``[:i]`` can be covered by workers ``0..k-1``.  Worker ``k``
        starting at ``i`` can end anywhere in ``(i, hi(i)]`` and ``hi`` never decreases with
        ``i``, so each layer is a sweep with two pointers and a difference array.
        """
        reach = [[i == 0 for i in range(m + 1)]]
        for k in range(n):
            prev, diff, hi = reach[-1], [0] * (m + 2), 0
            for i in range(m):
                hi = max(hi, i)
                while hi < m and fits(k, i, hi + 1, limit):
                    hi += 1
                if prev[i] and hi > i:
                    diff[i + 1] += 1
                    diff[hi + 1] -= 1
            run, row = 0, []
            for i in range(m + 1):
                run += diff[i]
                row.append(run > 0)
            reach.append(row)
        if not reach[n][m]:
            return None
        starts, j = [], m
        for k in range(n - 1, -1, -1):  # last stages as small as they can be
            i = next(i for i in range(j - 1, -1, -1) if reach[k][i] and fits(k, i, j, limit))
            starts.append(i)
            j = i
        return starts[::-1]

    lo, hi = 0.0, float(sum(costs)) / min(speeds) + 1.0
    best = fill(hi)
    if best is None:
        raise DoesNotFit(
            "the units cannot be laid out in order within the workers' memory; the biggest "
            "units need bigger workers earlier or later in the pipeline"
        )
    for _ in range(60):
        mid = (lo + hi) / 2
        starts = fill(mid)
        if starts is None:
            lo = mid
        else:
            hi, best = mid, starts
    return best


def slowest(costs: Sequence[float], starts: Sequence[int], speeds: Sequence[float]) -> float:
    """The slowest stage's time: ``max_k sum(costs of stage k) / speeds[k]``."""
    ends = [*starts[1:], len(costs)]
    return max(
        sum(costs[a:b]) / speeds[k] for k, (a, b) in enumerate(zip(starts, ends, strict=True))
    )


def balanced_order(
    costs: Sequence[float],
    sizes: Sequence[int],
    n: int,
    names: Sequence[str],
    *,
    memory: Sequence[int] | None = None,
    speeds: Sequence[float] | None = None,
    max_orders: int = 720,
) -> tuple[list[int], list[int]]:
    """:func:`balanced` over the best order of unequal workers.

    Which worker takes which stage matters when workers differ (the big-memory one may have to
    hold the embedding; the fast one should take the heaviest run of units), so every distinct
    order of the distinct workers is tried (up to ``max_orders``) and the one with the fastest
    slowest stage wins; ties keep the given order.  Returns ``(order, starts)``: stage ``k``
    runs on worker ``order[k]``.
    """
    if n < 1 or n > len(costs):
        equal_size(sizes, n, names)  # raises the same clear errors (before sizing lists by n)
    speeds = list(speeds or [1.0] * n)
    memory = list(memory or [])
    if len(speeds) != n or (memory and len(memory) != n):
        raise PlanError(f"give one speed and one memory size per stage ({n} stages)")
    profiles = [(memory[i] if memory else 0, speeds[i]) for i in range(n)]
    best: tuple[float, list[int], list[int]] | None = None
    first_error: DoesNotFit | None = None
    seen: set[tuple[tuple[int, float], ...]] = set()
    for k, order in enumerate(itertools.permutations(range(n))):
        if k >= max_orders:
            break
        key = tuple(profiles[i] for i in order)
        if key in seen:
            continue
        seen.add(key)
        sp = [speeds[i] for i in order]
        mem = [memory[i] for i in order] if memory else None
        try:
            starts = balanced(costs, sizes, n, names, memory=mem, speeds=sp)
        except DoesNotFit as e:
            first_error = first_error or e
            continue
        t = slowest(costs, starts, sp)
        if best is None or t < best[0] * (1 - 1e-9):
            best = (t, list(order), starts)
    if best is None:
        assert first_error is not None
        raise first_error
    return best[1], best[2]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
