"""Shard loading (only own tensors; clear errors) and a plain user nn.Module end to end."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline_core import (
    CheckpointError,
    InProcessPipeline,
    InputSpec,
    LocalPipeline,
    ModelSource,
    Policy,
    ReadStats,
    build_stage,
    make_plan,
)

from .models import hf_model, make_user_mlp, save_hf, save_safetensors_sharded
from .test_split_plan import MLP_INPUTS


@pytest.fixture()
def opt_dir(tmp_path):
    return save_hf(hf_model("opt"), tmp_path / "opt", shard="20KB")


def test_stage_reads_only_its_tensors(opt_dir):
    plan = make_plan(ModelSource(checkpoint=str(opt_dir)), Policy.equal_size(3))
    index = json.loads((opt_dir / "model.safetensors.index.json").read_text())["weight_map"]
    total = sum(f.stat().st_size for f in opt_dir.glob("*.safetensors"))
    for k, st in enumerate(plan.stages):
        stats = ReadStats()
        build_stage(plan, k, stats=stats)
        resolved = {
            t if t in index else next(a for a in plan.tied[t] if a in index) for t in st.tensors
        }
        assert set(stats.tensors) <= resolved
        assert set(stats.bytes_by_file) <= {index[t] for t in resolved}
        assert stats.total_bytes <= st.nbytes < total


def test_load_errors(opt_dir):
    plan = make_plan(ModelSource(checkpoint=str(opt_dir)), Policy.equal_size(2), trace=False)
    index_path = opt_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = plan.stages[1].tensors[0]
    # a tensor missing from the index
    broken = {**index, "weight_map": {k: v for k, v in index["weight_map"].items() if k != victim}}
    index_path.write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match=f"tensor '{victim}' is not in the checkpoint"):
        build_stage(plan, 1)
    # a missing shard file
    index_path.write_text(json.dumps(index))
    shard = opt_dir / index["weight_map"][victim]
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(CheckpointError, match="listed in the index but missing"):
        build_stage(plan, 1)
    # a corrupt shard
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        build_stage(plan, 1)
    shard.write_bytes(data)
    # no checkpoint at all
    index_path.unlink()
    for f in opt_dir.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        build_stage(plan, 0)


def test_shape_mismatch_is_reported(tmp_path):
    model = make_user_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"] = torch.zeros(7, 32)
    save_safetensors_sharded(state, tmp_path)
    src = ModelSource(checkpoint=str(tmp_path), factory="tests.models:make_user_mlp")
    plan = make_plan(src, Policy.manual(["blocks.3"]), inputs=MLP_INPUTS)
    with pytest.raises(CheckpointError, match=r"'head.weight' .* shape \[7, 32\]"):
        build_stage(plan, 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory,policy",
    [
        ("make_user_mlp", Policy.manual(["blocks.2", "blocks.5"])),
        ("make_user_mlp", Policy.equal_size(3)),
        ("make_user_mlp", Policy.threshold("80KB")),
        ("make_user_mlp_markers", Policy.markers()),
    ],
    ids=["manual", "equal_size", "threshold", "pipe_split"],
)
def test_user_module_pipeline(tmp_path, factory, policy):
    model = make_user_mlp()
    save_safetensors_sharded(dict(model.state_dict()), tmp_path)
    src = ModelSource(checkpoint=str(tmp_path), factory=f"tests.models:{factory}")
    plan = make_plan(src, policy, inputs=MLP_INPUTS)
    assert plan.num_stages >= 2
    if policy.kind == "markers":
        assert plan.split_points == ["blocks.2", "blocks.4"]
    x = torch.randn(7, 12)
    with torch.no_grad():
        ref = model(x)
    # the stage processes for one policy; the others' splits in one process (same stages)
    pipeline = LocalPipeline if policy.kind == "manual" else InProcessPipeline
    with pipeline(plan) as pipe:
        for chunks in (1, 2, 4):
            out = pipe(x, chunks=chunks)
            assert (out - ref).abs().max().item() <= 1e-5
        # several batches streamed through one fill-drain pass, results in order
        xs = [torch.randn(n, 12) for n in (3, 5, 2)]
        with torch.no_grad():
            refs = [model(b) for b in xs]
        outs = pipe.map([{"x": b} for b in xs], chunks=2)
        assert [o.shape for o in outs] == [r.shape for r in refs]
        assert all((o - r).abs().max().item() <= 1e-5 for o, r in zip(outs, refs, strict=True))


def _two_inputs(tmp_path, factory: str, stages: int, **pipe_kw):
    """Plan ``tests.models:<factory>`` (inputs x and y) on ``stages``; run one batch of 5 rows
    in 2 microbatches: (plan, single-process output, pipelined output)."""
    from . import models

    model = getattr(models, factory)()
    save_safetensors_sharded(dict(model.state_dict()), tmp_path)
    src = ModelSource(checkpoint=str(tmp_path), factory=f"tests.models:{factory}")
    inputs = [
        InputSpec(name="x", shape=[4, 4], dynamic={0: "batch"}),
        InputSpec(name="y", shape=[4, 8], dynamic={0: "batch"}),
    ]
    plan = make_plan(src, Policy.equal_size(stages), inputs=inputs)
    x, y = torch.randn(5, 4), torch.randn(5, 8)
    with torch.no_grad():
        ref = model(x, y)
    with LocalPipeline(plan, **pipe_kw) as pipe:
        return plan, ref, pipe(x, y, chunks=2)


@pytest.mark.slow
def test_user_module_two_inputs_tuple_outputs(tmp_path):
    """A model input read by every stage, and a tuple of outputs from the last stage."""
    plan, ref, out = _two_inputs(tmp_path, "make_two_in_two_out", 3, host_last_stage=False)
    assert [r for r in plan.stages[2].receives if r.get("name") == "y"]
    assert isinstance(out, tuple) and len(out) == 2
    for o, r in zip(out, ref, strict=True):
        assert (o - r).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_user_module_dict_output_keeps_its_structure(tmp_path):
    _, ref, out = _two_inputs(tmp_path, "make_dict_out", 2)
    assert isinstance(out, dict) and list(out) == ["logits", "extra"]
    assert isinstance(out["extra"], list) and len(out["extra"]) == 2
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=0, atol=1e-6)
    for o, r in zip(out["extra"], ref["extra"], strict=True):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-5)
