"""Capture a model with ``torch.export`` and cut it into stage graph modules.

The model is traced with *fake* parameters (no memory; see :mod:`.source`) on the target
device, with dynamic batch / sequence dimensions so a new shape never needs a re-trace, then
split by ``torch.distributed.pipelining`` at ``SplitPoint.BEGINNING`` of the chosen units (or at
the user's own ``pipe_split()`` markers).

The split's root graph says which value feeds which stage; we turn it into plain data
(:class:`Wire`) so the runtime can route values between processes, including values that skip
stages (a mask made on stage 0 and used on stage 2) and graph inputs that a later stage reads.

[Note: placeholder order]
A stage module's placeholders are not in the model's input order (the export sorts them), so
the wiring must be read from the root graph, never assumed.
"""

from __future__ import annotations

import inspect
import logging
import operator
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._pytree import tree_map

if TYPE_CHECKING:
    from torch.distributed.pipelining._IR import Pipe

# torch.distributed.pipelining and torch.export are imported where a model is traced, not
# here: planning by bytes, generation stages and every CLI process import this module, and
# those two take about half of a process's start-up (``python -X importtime``).

from .errors import TraceError
from .source import InputSpec, export_experts

log = logging.getLogger(__name__)

__all__ = ["TracedPipeline", "Wire", "trace_pipeline"]

WRAP_PREFIX = "m."
WHOLE = -2


@dataclass(kw_only=True)
class Wire:
    """Where one stage argument (or one pipeline output) comes from.

    ``src`` is ``"input"`` (a model input named ``name``), ``"stage"`` (output ``index`` of
    stage ``stage``; index -2 means the stage's whole return value) or ``"const"`` (the literal
    ``value``).
    """

    src: str
    name: str = ""
    stage: int = -1
    index: int = 0
    value: Any = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if k == "src" or v != _DEFAULTS[k]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Wire:
        return cls(**d)


_DEFAULTS = {"name": "", "stage": -1, "index": 0, "value": None}


@dataclass
class TracedPipeline:
    modules: list[fx.GraphModule]
    """One graph module per stage; parameters are still fake until materialized."""
    args: list[list[Wire]]
    """Per stage, where each positional argument comes from."""
    outputs: list[Wire]
    """Where each pipeline output comes from."""
    prefix: str
    """Prefix of parameter names in ``modules`` relative to the user's model ("m." for HF)."""
    meta: list[list[tuple[str, list[Any]]]]
    """Per stage, (dtype, symbolic shape) of each output, for plans and checks."""
    output_tree: str = ""
    """The model's output structure (a dict, nested lists...) as a dumped pytree spec."""
    rows: str = ""
    """Why the batch cannot be cut into microbatches (rows mix, like CLIP's image x text
    logits); empty when every output row depends only on the same input row's dim-0 size."""

    @property
    def num_stages(self) -> int:
        return len(self.modules)


def _fake_parameters(model: nn.Module, device: torch.device) -> FakeTensorMode:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, nn.Parameter] = {}  # one fake per tensor: tied weights stay tied
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                if id(p) not in fakes:
                    fakes[id(p)] = nn.Parameter(
                        FakeTensor(mode, p.data, device), requires_grad=False
                    )
                mod._parameters[name] = fakes[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != device and b.device.type != "meta":
                mod._buffers[name] = b.to(device)
    return mode


def _dynamic_shapes(inputs: list[InputSpec], infer: bool = False) -> tuple[Any, ...]:
    """Named dims (shared by name across inputs, bounded by ``spec.max``), or with ``infer``
    ``Dim.AUTO`` everywhere: export then works out which dims stay dynamic."""
    from torch.export import Dim

    dims: dict[str, Any] = {}
    per_input = []
    for spec in inputs:
        for d in spec.dynamic:
            if spec.shape[d] < 2:
                raise ValueError(
                    f"input {spec.name!r}: dynamic dimension {d} needs an example size >= 2 "
                    f"(got {spec.shape[d]}); torch.export specializes sizes 0 and 1"
                )
        per_input.append(
            {
                d: Dim.AUTO
                if infer
                else dims.setdefault(n, Dim(n, min=1, max=spec.max.get(d, 2**31 - 2)))
                for d, n in spec.dynamic.items()
            }
        )
    return (tuple(per_input),)


class HFForward(nn.Module):
    """Wrap a Hugging Face model so it takes tensors positionally and returns one tensor.

    Returns ``logits`` when the model produces them, else the first output
    (``last_hidden_state``).  No cache: generation uses another stage form.
    """

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.m = model
        self.input_names = list(input_names)
        params = inspect.signature(model.forward).parameters
        self.extra: dict[str, Any] = {}
        if "use_cache" in params:
            self.extra["use_cache"] = False
        if "return_dict" in params:
            self.extra["return_dict"] = True

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.m(**dict(zip(self.input_names, args, strict=True)), **self.extra)
        logits = getattr(out, "logits", None)
        if logits is not None:
            return logits
        return out[0] if isinstance(out, tuple | list) else out.to_tuple()[0]


class _Positional(nn.Module):
    """Give a plain model a ``*args`` forward so every model is exported the same way."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, *args: torch.Tensor) -> Any:
        return self.m(*args)


def model_name_of(name: str) -> str:
    """The model's name for a stage graph's tensor: ``torch.export`` unflattens a module called
    more than once (ALBERT's shared layer) into one copy per call, ``layer@1``, ``layer@2``."""
    return re.sub(r"@\d+(?=\.|$)", "", name)


def _export(wrapper: nn.Module, example: tuple[Any, ...], inputs: list[InputSpec]) -> Any:
    """``torch.export`` with the inputs' named dynamic dims.  Some torch releases cannot prove
    a guard that holds for every size (torch 2.11 on Llama: ``min(8*s, 16*s) == 8*s``) and
    refuse the named dims; then export again inferring the dims (``Dim.AUTO``), and keep that
    graph only if every dim meant to be dynamic stayed symbolic."""
    try:
        return torch.export.export(wrapper, example, dynamic_shapes=_dynamic_shapes(inputs))
    except Exception as e:
        if "Constraints violated" not in str(e):
            raise
        first = e
    log.warning("torch.export refused the named dynamic dims; inferring them: %s", first)
    ep = torch.export.export(wrapper, example, dynamic_shapes=_dynamic_shapes(inputs, infer=True))
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    users = [nodes[name] for name in ep.graph_signature.user_inputs]
    for spec, node in zip(inputs, users, strict=True):
        shape = node.meta["val"].shape
        if any(isinstance(shape[d], int) for d in spec.dynamic):
            raise first  # a size was fixed: the graph would not serve other shapes
    return ep


def trace_pipeline(
    model: nn.Module,
    inputs: list[InputSpec],
    split_points: list[str] | None,
    *,
    is_hf: bool,
    device: torch.device | str = "cpu",
) -> TracedPipeline:
    """Export ``model`` (a skeleton from :func:`build_skeleton`) and split it.

    Args:
        model: skeleton with meta parameters; it is modified (split annotations, fake
            parameters) and must not be reused.
        inputs: example input specs; dynamic dims stay symbolic.
        split_points: unit FQNs where stages 1.. begin, or None to use ``pipe_split()``
            markers inside the model's forward.
        is_hf: wrap a Hugging Face model so it returns one tensor (logits).
        device: where the stage will run (the graph records devices of created tensors).
    """
    from torch.distributed.pipelining import SplitPoint
    from torch.distributed.pipelining._IR import (
        MultiUseParameterConfig,
        Pipe,
        annotate_split_points,
    )

    device = torch.device(device)
    names = [s.name for s in inputs]
    export_experts(model)
    wrapper: nn.Module = HFForward(model, names) if is_hf else _Positional(model)
    if split_points:
        try:
            annotate_split_points(
                wrapper, {WRAP_PREFIX + p: SplitPoint.BEGINNING for p in split_points}
            )
        except AttributeError as e:
            raise TraceError(f"cannot place split points {split_points}: {e}") from e
    mode = _fake_parameters(wrapper, device)
    example = tuple(mode.from_tensor(s.example(device)) for s in inputs)
    try:
        ep = _export(wrapper, example, inputs)
        pipe = Pipe._from_traced(
            wrapper,
            ep,
            MultiUseParameterConfig.REPLICATE,
            output_loss_value_spec=None,
            split_policy=None,
        )
    except Exception as e:
        raise TraceError(
            f"torch.export could not capture {type(model).__name__} for pipelining: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Models need a "
            "full graph (no data-dependent control flow); check the example inputs' shapes "
            "and dtypes, or split a submodule that exports."
        ) from e
    traced = _wiring(pipe, names)
    traced.output_tree = _output_tree(ep, len(traced.outputs))
    return traced


def _output_tree(ep: Any, n_outputs: int) -> str:
    """The exported output's pytree spec, dumped, when it has one leaf per pipeline output
    (so :func:`restructure` can rebuild it); else empty (outputs come back as a tuple)."""
    from torch.utils._pytree import treespec_dumps

    try:
        spec = ep.call_spec.out_spec
        return treespec_dumps(spec) if spec.num_leaves == n_outputs else ""
    except Exception:  # a node type pytree cannot serialize
        return ""


def restructure(out: Any, tree: str) -> Any:
    """A pipeline's output (one value, or a tuple of them) in the model's own structure."""
    if not tree:
        return out
    from torch.utils._pytree import tree_unflatten, treespec_loads

    spec = treespec_loads(tree)
    leaves = list(out) if isinstance(out, tuple) and spec.num_leaves != 1 else [out]
    return tree_unflatten(leaves, spec) if len(leaves) == spec.num_leaves else out


@dataclass(frozen=True)
class ArgSpec:
    """A tensor argument seen on fake tensors: enough to make a real one of its kind."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ArgSpec(tuple(int(d) for d in v.shape), v.dtype)
        return v

    def make(self, device: torch.device | str) -> torch.Tensor:
        """Random floats, zeros for integers (valid indices and positions), True for bools."""
        if self.dtype.is_floating_point:
            return torch.randn(self.shape, device=device).to(self.dtype)
        if self.dtype == torch.bool:
            return torch.ones(self.shape, dtype=torch.bool, device=device)
        return torch.zeros(self.shape, dtype=self.dtype, device=device)


def _count_cpu_attention() -> None:
    """``FlopCounterMode`` has no formula for the CPU flash-attention kernel, so attention
    would count 0 FLOPs on CPU (its share grows with sequence length); register one."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa_flops(
        query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
    ) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def call_order(
    model: nn.Module,
    inputs: list[InputSpec],
    names: list[str],
    *,
    is_hf: bool,
    capture: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """``names`` (module FQNs) sorted by when ``forward`` first calls them.

    Registration order is not execution order (OPT registers ``final_layer_norm`` before the
    layers; Llama registers ``rotary_emb`` last but runs it first), so the planner orders units
    by one forward pass on fake tensors (no memory, no real compute).  Modules that are never
    called keep their place before the next called module.  ``model``'s parameters become fake.

    Returns the ordered names, how many times each was called (a module called twice, like
    T5's shared dropout, cannot begin a stage) and the FLOPs each ran on the example inputs
    (``torch.utils.flop_counter``: matmuls, convolutions, attention; lookups count 0).  With
    ``capture``, each unit's first ``(args, kwargs)`` is stored there, tensors as
    :class:`ArgSpec` (what the profiler in :mod:`.cost` feeds a unit run alone).
    """
    from torch.utils.flop_counter import FlopCounterMode

    wrapper: nn.Module = HFForward(model, [s.name for s in inputs]) if is_hf else model
    mode = _fake_parameters(wrapper, torch.device("cpu"))
    first: dict[str, int] = {}
    calls: dict[str, int] = dict.fromkeys(names, 0)
    hooks = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(_m: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
            first.setdefault(name, len(first))
            calls[name] += 1
            if capture is not None and name not in capture:
                capture[name] = tree_map(ArgSpec.of, (args, kwargs))

        hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    _count_cpu_attention()
    counter = FlopCounterMode(display=False)
    try:
        with mode, torch.no_grad(), counter:
            wrapper(*(mode.from_tensor(s.example()) for s in inputs))
    except Exception as e:
        raise TraceError(
            f"running {type(model).__name__} on fake example inputs failed: "
            f"{type(e).__name__}: {e}; {_why(e)}"
        ) from e
    finally:
        for h in hooks:
            h.remove()
    key: dict[int, tuple[int, int]] = {}
    pending: list[int] = []
    for i, name in enumerate(names):
        if name in first:
            key.update({j: (first[name], j - len(names)) for j in pending})
            pending.clear()
            key[i] = (first[name], 0)
        else:
            pending.append(i)
    key.update({j: (len(names), j) for j in pending})
    order = sorted(range(len(names)), key=key.__getitem__)
    root = type(wrapper).__name__ + (".m." if is_hf else ".")
    counts = counter.get_flop_counts()
    flops = {n: int(sum(counts.get(root + n, {}).values())) for n in names}
    return [names[i] for i in order], calls, flops


def _why(e: Exception) -> str:
    """What to tell the user about a failed pass on fake tensors."""
    if isinstance(e, DataDependentOutputException | DynamicOutputShapeException):
        return (
            "its forward reads the values of its own tensors (`if mask.any():`, `.item()`, "
            "`nonzero`), which the planner's pass on fake tensors (no weights in memory) "
            "cannot answer, so this model cannot be planned"
        )
    return "check the example inputs"


def _wiring(pipe: Pipe, input_names: list[str]) -> TracedPipeline:
    graph = pipe.split_gm.graph
    stage_of: dict[str, int] = {}
    placeholder_input: dict[str, str] = {}
    getitem: dict[str, tuple[int, int]] = {}
    modules: list[fx.GraphModule] = []
    args: list[list[Wire]] = []
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, input_names, strict=True):
        placeholder_input[node.name] = name

    def wire(a: Any, consumer: str) -> Wire:
        if isinstance(a, fx.Node):
            if a.name in placeholder_input:
                return Wire(src="input", name=placeholder_input[a.name])
            if a.name in getitem:
                st, idx = getitem[a.name]
                return Wire(src="stage", stage=st, index=idx)
            if a.name in stage_of:  # no getitem: the stage returns one value
                return Wire(src="stage", stage=stage_of[a.name], index=WHOLE)
            raise TraceError(f"unexpected value {a.name} feeding {consumer}")
        if a is None or isinstance(a, int | float | bool):
            return Wire(src="const", value=a)
        raise TraceError(f"unsupported constant {a!r} feeding {consumer}")

    for node in graph.nodes:
        if node.op == "call_module":
            if node.kwargs:
                raise TraceError(f"stage {node.target} takes keyword arguments; not supported")
            stage_of[node.name] = len(modules)
            modules.append(pipe.split_gm.get_submodule(node.target))
            args.append([wire(a, node.target) for a in node.args])
        elif node.op == "call_function" and node.target is operator.getitem:
            src, idx = node.args
            if src.name not in stage_of:
                raise TraceError(f"unexpected getitem on {src.name}")
            getitem[node.name] = (stage_of[src.name], idx)
        elif node.op == "output":
            out = node.args[0]
            outs = list(out) if isinstance(out, tuple | list) else [out]
            outputs = [wire(o, "output") for o in outs]
    meta = [_output_meta(m) for m in modules]
    return TracedPipeline(
        modules=modules,
        args=args,
        outputs=outputs,
        prefix=WRAP_PREFIX,
        meta=meta,
        rows=_rows_mixed(placeholders, outputs, meta),
    )


def _rows_mixed(
    placeholders: list[fx.Node], outputs: list[Wire], meta: list[list[tuple[str, list[Any]]]]
) -> str:
    """Microbatches cut every input along dim 0 and concatenate outputs along dim 0; that is
    only right when all inputs share one dim-0 size and every output has it at dim 0 only."""
    firsts = set()
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim():
            firsts.add(str(val.shape[0]))
    if len(firsts) != 1:
        return f"the inputs' dim 0 sizes are not one batch size ({sorted(firsts)})"
    (batch,) = firsts
    if batch.isdigit():  # a fixed batch: the graph itself refuses other sizes
        return ""
    for w in outputs:
        if w.src != "stage":
            continue
        _, shape = meta[w.stage][0 if w.index == WHOLE else w.index]
        if shape and (shape[0] != batch or batch in shape[1:]):
            return f"an output of shape {shape} mixes rows of the batch ({batch})"
    return ""


def _output_meta(gm: fx.GraphModule) -> list[tuple[str, list[Any]]]:
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    vals = out_node.args[0]
    vals = list(vals) if isinstance(vals, tuple | list) else [vals]
    result: list[tuple[str, list[Any]]] = []
    for v in vals:
        val = v.meta.get("val") if isinstance(v, fx.Node) else v
        if isinstance(val, torch.Tensor):
            result.append((str(val.dtype).removeprefix("torch."), [str(s) for s in val.shape]))
        else:
            result.append((type(val).__name__, []))
    return result
