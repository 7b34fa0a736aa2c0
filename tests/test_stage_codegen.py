"""Stages run their graphs as generated Python (not node by node), with the interpreter as the
fallback: same outputs either way."""

from __future__ import annotations

import torch
from torch import nn

from pipeline_core import ModelSource, Policy, build_stage, make_plan
from pipeline_core.stage import _interpreter_modules

from .models import VOCAB, hf_model, save_hf


class _Broken(nn.Module):
    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("generated code broke")


def test_generated_forward_and_interpreter_fallback(tmp_path):
    model = hf_model("gpt2")
    save_hf(model, tmp_path)
    plan = make_plan(ModelSource(checkpoint=str(tmp_path)), Policy.equal_size(1))
    stage = build_stage(plan, 0)
    mods = _interpreter_modules(stage.module)
    assert mods and not any(m._run_with_interpreter for m in mods)  # generated Python
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(stage.forward([ids, mask]), want)
    # a submodule whose generated code fails: the stage interprets its graphs instead
    mods[-1].graph_module = _Broken()
    assert torch.equal(stage.forward([ids, mask]), want)
    assert all(m._run_with_interpreter for m in mods)


def test_export_infers_dims_when_named_dims_are_refused(tmp_path, monkeypatch):
    """A torch that cannot prove a guard refuses the named dims (torch 2.11 on Llama); the
    trace then lets export infer them, and the stage still serves any batch and length."""
    real = torch.export.export
    refused = []

    def export(mod, args, *a, dynamic_shapes=None, **kw):
        dims = [d for spec in dynamic_shapes[0] for d in spec.values()]
        if any(d is not torch.export.Dim.AUTO for d in dims):
            refused.append(dims)
            raise RuntimeError("Constraints violated (seq)! min(8*seq, 16*seq) == 8*seq")
        return real(mod, args, *a, dynamic_shapes=dynamic_shapes, **kw)

    monkeypatch.setattr(torch.export, "export", export)
    model = hf_model("llama")
    save_hf(model, tmp_path)
    plan = make_plan(ModelSource(checkpoint=str(tmp_path)), Policy.equal_size(1))
    stage = build_stage(plan, 0)
    assert refused
    for batch, seq in ((2, 7), (3, 12)):
        ids = torch.randint(0, VOCAB, (batch, seq))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(stage.forward([ids, mask]), want, atol=1e-5)
