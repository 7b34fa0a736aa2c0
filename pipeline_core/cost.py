"""What each unit costs, for planning by time: seconds per microbatch, FLOPs, KV bytes per token.

[Note: how a unit's time is estimated]
* The workload (:class:`Workload`) says what the pipeline will run: ``batch`` rows of ``seq``
  tokens cut into ``chunks`` microbatches, on ``device`` with ``threads`` threads per stage.
* One fake-tensor forward at the microbatch's shape (no memory, no compute) records each
  unit's FLOPs (``torch.utils.flop_counter``, attention included) and the arguments it is
  called with.
* **Profile**: one unit of each *kind* (same class, parameter shapes and argument shapes --
  all the decoder layers of a model are one kind) is built alone on the target device with
  random weights of its shape (never the checkpoint), called with random arguments of the
  recorded shapes, and timed (median of a few runs after a warm-up).  Times are cached per
  (torch, device, dtype, threads, kind) in a :class:`~.profile_cache.ProfileCache` file (the
  CLI and servers: ``$PIPESERVE_PROFILE_CACHE``; default
  ``~/.cache/pipeserve/unit-profiles.json``), so planning the same model again costs nothing.
* **Fallback** (``profile=False``, or a unit that cannot run alone): FLOPs divided by the
  device's measured matmul FLOP/s (:func:`device_flops`) -- lookups count 0, linear layers
  ``2 * in * out`` per token, attention by sequence length.
* **KV cache**: for Hugging Face models one fake forward with ``use_cache=True`` measures how
  many cache bytes each unit adds per token, so a stage's memory is its weights plus
  ``kv_bytes_per_token * kv_tokens``.

Not modelled: transfers between stages (an activation per microbatch; small next to compute
on these models) and code outside the units (mask building).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import PlanError
from .profile_cache import PROFILE_CACHE_ENV, ProfileCache
from .source import InputSpec, ModelSource, build_skeleton
from .split import _human
from .trace import ArgSpec, _fake_parameters, call_order
from .units import Unit

__all__ = [
    "PROFILE_CACHE_ENV",
    "UnitCost",
    "Workload",
    "cpu_fields",
    "cpu_name",
    "device_flops",
    "device_name",
    "estimate_units",
    "kv_bytes_per_token",
]

_REPS, _MIN_S = 5, 0.3
MAX_PROFILE_TOKENS = 65536
"""Largest microbatch (rows x seq) a unit is profiled at: bounds the profiler's memory."""
PROFILE_MAX_BYTES = 512 * 2**20
"""Largest unit (weights in the plan's dtype) built to be timed; a larger one is estimated
from FLOPs, so planning a 70B model stays under 1 GiB of memory."""
PROFILE_MAX_SECONDS = 0.5
"""Longest a unit's run may be expected to take (FLOPs / the device's measured rate) to be
timed; a slower one is estimated from FLOPs (bf16 layers of a 7B model on a CPU without bf16
matmuls: ~100 s a run)."""
TABLE_ROWS = 4096
"""Rows of the stand-in table an embedding lookup is timed on (a lookup's cost does not grow
with the table), and the most output rows a vocabulary-sized linear head is timed on (its time
is then scaled by its rows)."""


@dataclass(kw_only=True)
class Workload:
    """What the pipeline will run, for estimating stage times and memory."""

    batch: int = 8
    """Rows per batch."""
    seq: int = 128
    """Tokens per row (text models)."""
    chunks: int = 4
    """Microbatches per batch."""
    kv_tokens: int = 0
    """Tokens of KV cache each stage must hold (generation: e.g. the engine's ``max_tokens``)."""
    device: str = "cpu"
    threads: int = 1
    """Threads per stage (``torch.set_num_threads``) while profiling."""
    profile: bool = True
    """False: estimate times from FLOPs only (no unit is run)."""

    @property
    def microbatch(self) -> int:
        return -(-self.batch // self.chunks)

    def check(self) -> None:
        for name in ("batch", "seq", "chunks", "threads"):
            if getattr(self, name) < 1:
                raise PlanError(f"workload {name} must be at least 1, not {getattr(self, name)}")
        if self.kv_tokens < 0:
            raise PlanError(f"workload kv_tokens must be >= 0, not {self.kv_tokens}")
        if self.microbatch * self.seq > MAX_PROFILE_TOKENS:
            raise PlanError(
                f"a microbatch of {self.microbatch} x {self.seq} tokens is more than the "
                f"{MAX_PROFILE_TOKENS} tokens a plan estimates times for; use more chunks or "
                "a shorter seq (times scale about linearly beyond)"
            )

    def shape(self, inputs: list[InputSpec]) -> list[InputSpec]:
        """``inputs`` resized to one microbatch (dimensions named ``batch`` and ``seq``)."""
        out = []
        for s in inputs:
            shape = list(s.shape)
            for d, name in s.dynamic.items():
                if name == "batch":
                    shape[d] = self.microbatch
                elif name == "seq":
                    shape[d] = max(2, min(self.seq, s.max.get(d, self.seq)))
            out.append(replace(s, shape=shape))
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class UnitCost:
    name: str
    seconds: float
    """Per microbatch on the profiled device."""
    flops: int
    """Per microbatch."""
    kv_bytes_per_token: int = 0
    source: str = "flops"
    """``profile`` (run now), ``cache`` (run before) or ``flops`` (FLOPs / device FLOP/s)."""


def device_name(device: str | torch.device) -> str:
    """The device's model, for cache keys and reports (``cuda:0`` -> the GPU's name)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{cpu_name()}"


def cpu_fields() -> dict[str, str]:
    """``/proc/cpuinfo``'s fields as the first CPU lists them (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return cpu_fields().get("model name") or platform.processor() or platform.machine() or "unknown"


def _key(device: str, dtype: torch.dtype, threads: int, what: str) -> str:
    parts = [torch.__version__, device_name(device), str(dtype), str(threads), what]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, device: torch.device) -> float:
    """Median seconds of ``fn()`` after one warm-up (at least 3 runs, up to ``_REPS``)."""
    fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < _REPS and time.perf_counter() - start < _MIN_S):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_flops(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    threads: int = 1,
    cache: ProfileCache | None = None,
) -> float:
    """Measured matmul FLOP/s of ``device`` (kept in ``cache``; None: the default file): the
    speed figure a worker reports, and the rate that turns FLOPs into seconds where a unit is
    not profiled."""
    cache = cache or ProfileCache()
    dev = torch.device(device)
    n = 2048 if dev.type == "cuda" else 768 if dtype == torch.float32 else 384
    key = _key(str(dev), dtype, threads, f"matmul{n}")
    cached = cache.get(key)
    if cached is not None:
        return 2 * n**3 / cached
    with _threads(threads), torch.no_grad():
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        seconds = _time(lambda: torch.mm(a, b), dev)
    cache.put(key, seconds, f"{n}x{n} matmul")
    return 2 * n**3 / seconds


# ---------------------------------------------------------------------------------------------
# profiling units


def _kind(name: str, module: nn.Module, call: Any) -> str:
    """Units of one kind cost the same: class, parameter shapes and argument shapes."""
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in module.state_dict().items()]
    leaves, _ = tree_flatten(call)
    args = [
        (leaf.shape, str(leaf.dtype)) if isinstance(leaf, ArgSpec) else type(leaf).__name__
        for leaf in leaves
    ]
    return repr((type(module).__qualname__, sorted(tensors), args))


def _materialize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of a meta ``module`` on ``device`` with random weights of its shapes."""
    mod = copy.deepcopy(module).to_empty(device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for t in [*mod.parameters(), *mod.buffers()]:
            if t.dtype.is_floating_point:
                t.copy_(torch.randn(t.shape, generator=gen).mul_(0.02).to(t.dtype))
            elif t.dtype == torch.bool:
                t.fill_(True)
            else:
                t.zero_()
    return mod.eval()


def _stand_in(module: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, float] | None:
    """A smaller module timed in place of a vocabulary-sized one, and the factor its time is
    scaled by (see :data:`TABLE_ROWS`); None: time the module itself."""
    if isinstance(module, nn.Embedding) and module.num_embeddings > TABLE_ROWS:
        return nn.Embedding(TABLE_ROWS, module.embedding_dim, device="meta", dtype=dtype), 1.0
    if isinstance(module, nn.Linear) and module.out_features > TABLE_ROWS:
        bias = module.bias is not None
        sliced = nn.Linear(module.in_features, TABLE_ROWS, bias, device="meta", dtype=dtype)
        return sliced, module.out_features / TABLE_ROWS
    return None


def _nbytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _profile_kind(
    module: nn.Module, call: Any, device: torch.device, dtype: torch.dtype, threads: int
) -> float:
    scale = 1.0
    small = _stand_in(module, dtype)
    if small is not None:
        module, scale = small
    mod = _materialize(module, device, dtype)

    def real(v: Any) -> Any:
        if isinstance(v, ArgSpec):
            t = v.make(device)
            return t.to(dtype) if t.is_floating_point() else t
        return v

    args, kwargs = tree_map(real, call)
    with _threads(threads), torch.no_grad():
        seconds = _time(lambda: mod(*args, **kwargs), device)
    return seconds * scale


def _too_big(module: nn.Module, flops: int, rate: float, dtype: torch.dtype) -> str:
    """Why ``module`` is estimated from FLOPs instead of timed (empty: time it)."""
    small = _stand_in(module, dtype)
    if small is not None:
        module, scale = small
        flops = int(flops / scale)
    if _nbytes(module) > PROFILE_MAX_BYTES:
        return f"larger than {_human(PROFILE_MAX_BYTES)}"
    if rate and flops / rate > PROFILE_MAX_SECONDS:
        return f"a run would take ~{flops / rate:.0f} s"
    return ""


def _profile(
    model: nn.Module,
    units: list[Unit],
    calls: dict[str, Any],
    counts: dict[str, int],
    workload: Workload,
    dtype: torch.dtype,
    flops: dict[str, int],
    rate: float,
    cache: ProfileCache,
) -> tuple[dict[str, tuple[float, str]], dict[str, str]]:
    """Seconds per unit (and where they came from) for every unit whose modules all ran alone,
    and for the units left to FLOPs because a module is too large or slow to time, why.

    One module is built at a time (random weights, in ``dtype``) and freed before the next."""
    device = torch.device(workload.device)
    by_kind: dict[str, tuple[float, str] | None] = {}
    out: dict[str, tuple[float, str]] = {}
    notes: dict[str, str] = {}
    for u in units:
        total, source = 0.0, "cache"
        for name in u.modules:
            if name not in calls:
                continue  # never called: costs nothing
            module = model.get_submodule(name)
            kind = _kind(name, module, calls[name])
            if kind not in by_kind:
                key = _key(str(device), dtype, workload.threads, kind)
                cached = cache.get(key)
                why = (
                    "" if cached is not None else _too_big(module, flops.get(name, 0), rate, dtype)
                )
                if cached is not None:
                    by_kind[kind] = (cached, "cache")
                elif why:
                    by_kind[kind] = None
                    notes[u.name] = f"{type(module).__name__} not timed: {why}"
                else:
                    try:
                        s = _profile_kind(module, calls[name], device, dtype, workload.threads)
                    except Exception:  # cannot run alone (needs state from its parent)
                        by_kind[kind] = None
                    else:
                        cache.put(key, s, f"{type(module).__qualname__} ({name})")
                        by_kind[kind] = (s, "profile")
            got = by_kind[kind]
            if got is None:
                break
            total += got[0] * max(1, counts.get(name, 1))
            if got[1] == "profile":
                source = "profile"
        else:
            out[u.name] = (total, source)
    return out, notes


# ---------------------------------------------------------------------------------------------
# KV cache bytes


def _tensor_bytes(obj: Any, seen: set[int], depth: int = 0) -> int:
    if id(obj) in seen or depth > 6:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(x, seen, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen, depth + 1) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, nn.Module | type):
        return sum(_tensor_bytes(x, seen, depth + 1) for x in vars(obj).values())
    return 0


def _caches(args: Any, kwargs: Any) -> list[Any]:
    from transformers.cache_utils import Cache

    return [v for v in [*args, *kwargs.values()] if isinstance(v, Cache)]


def kv_bytes_per_token(
    source: ModelSource, dtype: torch.dtype, inputs: list[InputSpec], units: list[Unit]
) -> dict[str, int]:
    """KV-cache bytes each unit adds per token (Hugging Face models with a cache; else {})."""
    if not source.is_hf:
        return {}
    model = build_skeleton(source, dtype)
    if "use_cache" not in inspect.signature(model.forward).parameters:
        return {}
    seq_inputs = [s for s in inputs if "seq" in s.dynamic.values()]
    if not seq_inputs:
        return {}
    mode = _fake_parameters(model, torch.device("cpu"))
    added: dict[str, int] = {}
    before: dict[str, int] = {}
    hooks = []
    for u in units:
        mod = model.get_submodule(u.name)

        def pre(_m: nn.Module, args: Any, kwargs: Any, name: str = u.name) -> None:
            before[name] = sum(_tensor_bytes(c, set()) for c in _caches(args, kwargs))

        def post(_m: nn.Module, args: Any, kwargs: Any, _out: Any, name: str = u.name) -> None:
            now = sum(_tensor_bytes(c, set()) for c in _caches(args, kwargs))
            added[name] = added.get(name, 0) + max(0, now - before.get(name, now))

        hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(mod.register_forward_hook(post, with_kwargs=True))
    tokens = seq_inputs[-1].shape[0] * seq_inputs[-1].shape[1]
    try:
        with mode, torch.no_grad():
            model(**{s.name: mode.from_tensor(s.example()) for s in inputs}, use_cache=True)
    except Exception:
        return {}  # no cache on this model's forward: KV bytes unknown (0)
    finally:
        for h in hooks:
            h.remove()
    return {name: b // tokens for name, b in added.items() if b}


# ---------------------------------------------------------------------------------------------


def estimate_units(
    source: ModelSource,
    units: list[Unit],
    inputs: list[InputSpec],
    workload: Workload,
    dtype: torch.dtype,
    cache: ProfileCache | None = None,
) -> list[UnitCost]:
    """Each unit's cost for one microbatch of ``workload`` (see the module's note); measured
    times are kept in ``cache`` (None: the default file)."""
    cache = cache or ProfileCache()
    workload.check()
    shaped = workload.shape(inputs)
    names = [m for u in units for m in u.modules]
    calls: dict[str, Any] = {}
    _order, counts, flops = call_order(
        build_skeleton(source, dtype), shaped, names, is_hf=source.is_hf, capture=calls
    )
    timed: dict[str, tuple[float, str]] = {}
    notes: dict[str, str] = {}
    # the FLOP rate (a small matmul benchmark unless cached): for units left to FLOPs, and to
    # leave out of profiling a unit whose run would take too long
    rate = device_flops(workload.device, dtype, workload.threads, cache)
    if workload.profile:
        model = build_skeleton(source, dtype)  # call_order made the other one's tensors fake
        timed, notes = _profile(model, units, calls, counts, workload, dtype, flops, rate, cache)
    kv = kv_bytes_per_token(source, dtype, inputs, units)
    out = []
    for u in units:
        f = sum(flops.get(m, 0) for m in u.modules)
        seconds, src = timed[u.name] if u.name in timed else (f / rate, "flops")
        if u.name in notes:
            src = f"flops ({notes[u.name]})"
        out.append(
            UnitCost(
                name=u.name,
                seconds=seconds,
                flops=f,
                kv_bytes_per_token=kv.get(u.name, 0),
                source=src,
            )
        )
    return out
