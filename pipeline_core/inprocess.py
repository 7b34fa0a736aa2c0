"""Run a plan's stages one after another in this process: the split without the processes.

:class:`InProcessPipeline` builds every stage of a plan from one trace
(:func:`~pipeline_core.stage.build_stages`: the same graphs and checkpoint shards a stage
process loads), cuts each batch into the same microbatches as :class:`~.local.LocalPipeline`
and routes values by the plan's wiring as the driver does (:class:`~.runtime.Routes`); every
value that would cross a process (inputs to a stage, a stage's outputs to another stage or to
the driver) is first encoded by the transport's message codec (a value it cannot carry raises
``TransportError``, as a stage process would) and arrives as the transport delivers it (lists
as tuples, tensors as copies).
No overlap between stages and no start-up: for tests that check a split's numbers for many
models, and for debugging a plan with tracebacks in one place.  One real multi-process run
proves the transport and the processes (``tests/test_pipeline_e2e.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from .microbatch import check_chunks, merge_microbatches, split_microbatches
from .plan import Plan
from .runtime import DRIVER, Routes, pick, resolve
from .source import check_inputs
from .stage import Stage, build_stages
from .trace import Wire, restructure
from .transport import decode_header, encode_header

__all__ = ["InProcessPipeline"]


def _as_sent(value: Any) -> Any:
    """``value`` as a stage process receives it (see :class:`~.transport.Channel`)."""
    if isinstance(value, torch.Tensor):
        return value.detach().contiguous().clone()
    if isinstance(value, tuple | list):
        return tuple(_as_sent(v) for v in value)
    return value


def _carry(values: list[Any]) -> list[Any]:
    """Encode ``values`` as one message (raises when the transport cannot carry one) and
    return them as they would arrive."""
    decode_header(encode_header(values)[0])
    return [_as_sent(v) for v in values]


class InProcessPipeline:
    """Every stage of ``plan`` in this process, called like :class:`~.local.LocalPipeline`:
    ``pipe(input_ids=..., chunks=4)`` returns the model's output."""

    def __init__(self, plan: Plan, device: torch.device | str = "cpu") -> None:
        self.plan = plan
        self.stages: list[Stage] = build_stages(plan, device)
        self.args: list[list[Wire]] = self.stages[0].args
        self.outputs: list[Wire] = self.stages[0].outputs
        self.routes = Routes.from_wiring(self.args, self.outputs)

    def __call__(self, *args: Any, chunks: int = 1, **inputs: Any) -> Any:
        """Run the model on a batch; positional args follow the plan's input order."""
        names = [s.name for s in self.plan.inputs]
        if len(args) > len(names):
            raise TypeError(f"expected at most {len(names)} positional inputs ({names})")
        inputs.update(zip(names, args, strict=False))
        check_inputs(self.plan.inputs, inputs, self.routes.input_names)
        check_chunks(chunks, self.plan.rows_mixed)
        results = [self._microbatch(mb) for mb in split_microbatches(inputs, chunks)]
        return restructure(merge_microbatches(results), self.plan.output_tree)

    def map(self, batches: list[dict[str, Any]], chunks: int = 1) -> list[Any]:
        """One output per batch of named inputs, in order (as :meth:`LocalPipeline.map`)."""
        return [self(**b, chunks=chunks) for b in batches]

    def __enter__(self) -> InProcessPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _microbatch(self, mb: dict[str, Any]) -> Any:
        routes = self.routes
        received: dict[tuple[int, Any], Any] = {}  # (producer, key) -> value as received
        for k, stage in enumerate(self.stages):
            names = routes.flows.get((DRIVER, k), [])
            fed = _carry([mb[n] for n in names])
            received.update({(DRIVER, n): v for n, v in zip(names, fed, strict=True)})
            raw = stage.forward([resolve(w, received, {}) for w in stage.my_args])
            wanted = routes.sent(k)
            out = _carry([pick(raw, i) for i in wanted])
            received.update({(k, i): v for i, v in zip(wanted, out, strict=True)})
        outs = [resolve(w, received, mb) for w in self.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)
