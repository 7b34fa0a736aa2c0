"""Split policies, units, plans and their errors (no processes)."""

from __future__ import annotations

import json
import resource

import pytest
import torch

from pipeline_core import ModelSource, Plan, PlanError, Policy, make_plan
from pipeline_core import split as sp
from pipeline_core.schedule import fill_drain, render, validate
from pipeline_core.source import InputSpec, build_skeleton
from pipeline_core.transport import StageFailure, decode_header, encode_header

from .models import hf_model, save_hf, save_safetensors_sharded

MLP_INPUTS = [InputSpec(name="x", shape=[4, 12], dynamic={0: "batch"})]


def naive_greedy(sizes, n):
    """Fill each stage up to total/n (what a naive splitter does)."""
    target = sum(sizes) / n
    starts, acc = [0], 0
    for i, s in enumerate(sizes):
        if acc + s > target and acc > 0 and len(starts) < n:
            starts.append(i)
            acc = 0
        acc += s
    return starts


def test_equal_size_is_optimal_and_beats_greedy():
    sizes = [10, 10, 10, 10, 35, 10, 10, 10, 30, 5, 50]
    starts = sp.equal_size(sizes, 3)
    assert len(starts) == 3
    best = max(sp.stage_sizes(sizes, starts))
    # brute force over all 2-cut positions
    brute = min(
        max(sum(sizes[:a]), sum(sizes[a:b]), sum(sizes[b:]))
        for a in range(1, len(sizes))
        for b in range(a + 1, len(sizes))
    )
    assert best == brute
    assert best < max(sp.stage_sizes(sizes, naive_greedy(sizes, 3)))


@pytest.mark.parametrize("n", [1, 2, 5, 11])
def test_equal_size_exactly_n_nonempty(n):
    sizes = [3, 0, 7, 1, 1, 9, 2, 0, 4, 4, 6]
    starts = sp.equal_size(sizes, n)
    assert len(starts) == n and starts == sorted(set(starts)) and starts[0] == 0


def test_policy_errors():
    with pytest.raises(PlanError, match="cannot make 4 stages from 3 units"):
        sp.equal_size([1, 2, 3], 4)
    with pytest.raises(PlanError, match="at least 1"):
        sp.equal_size([1, 2, 3], 0)
    with pytest.raises(PlanError, match="unit 'big' is 500 bytes"):
        sp.threshold([100, 500, 10], 200, ["a", "big", "c"])
    for bad in ("0", "-5MB", "abc", "12 parsecs"):
        with pytest.raises(PlanError):
            sp.parse_size(bad)
    assert sp.parse_size("500MB") == 500_000_000
    assert sp.parse_size("1.5GiB") == int(1.5 * 2**30)
    with pytest.raises(PlanError, match=r"unknown split point 'layers\.99'"):
        sp.manual(["embed", "layers.0", "layers.1"], ["layers.99"])
    with pytest.raises(PlanError, match="first unit"):
        sp.manual(["embed", "layers.0"], ["embed"])


def test_threshold_starts_new_stage_before_passing_limit():
    assert sp.threshold([4, 4, 4, 4, 4], 9, list("abcde")) == [0, 2, 4]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf(hf_model("llama"), tmp_path_factory.mktemp("llama"))


def test_units_and_plan_json_roundtrip(llama_dir):
    plan = make_plan(ModelSource(checkpoint=str(llama_dir)), Policy.equal_size(3))
    names = [u["name"] for u in plan.units]
    # execution order, found generically: rotary_emb runs before the layers
    assert names.index("model.rotary_emb") < names.index("model.layers.0")
    assert names[-1] == "lm_head"
    # tied lm_head <-> embed_tokens is recorded; every persistent tensor is owned somewhere
    assert "model.embed_tokens.weight" in plan.tied["lm_head.weight"]
    owned = [t for s in plan.stages for t in s.tensors]
    assert len(owned) == len(set(owned))
    assert plan.stages[1].receives and plan.stages[0].sends
    again = Plan.from_json(json.loads(plan.dumps()))
    assert again == plan
    bad = plan.to_json() | {"version": 99}
    with pytest.raises(PlanError, match="version 99"):
        Plan.from_json(bad)


def test_manual_unknown_split_point(llama_dir):
    with pytest.raises(PlanError, match=r"unknown split point 'model\.layers\.7'"):
        make_plan(ModelSource(checkpoint=str(llama_dir)), Policy.manual(["model.layers.7"]))


def test_more_stages_than_units(llama_dir):
    with pytest.raises(PlanError, match="cannot make 40 stages"):
        make_plan(ModelSource(checkpoint=str(llama_dir)), Policy.equal_size(40))


def test_planning_allocates_no_weight_memory(tmp_path):
    """A ~1.6 GB (fp32) config plans with parameters on meta and little RSS growth."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=8,
        num_attention_heads=16,
    ).save_pretrained(tmp_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = build_skeleton(ModelSource(checkpoint=str(tmp_path)))
    assert all(p.device.type == "meta" for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = make_plan(ModelSource(checkpoint=str(tmp_path)), Policy.equal_size(4), trace=False)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert total > 1.5e9 and plan.total_bytes >= total
    assert grown < 0.1 * total, f"RSS grew {grown} bytes while planning {total} bytes"


def test_user_module_units_and_policies(tmp_path):
    src = ModelSource(checkpoint=str(tmp_path), factory="tests.models:make_user_mlp")
    names = [
        u["name"]
        for u in make_plan(src, Policy.equal_size(2), inputs=MLP_INPUTS, trace=False).units
    ]
    assert names == ["embed", *[f"blocks.{i}" for i in range(6)], "head"]
    eq = make_plan(src, Policy.equal_size(3), inputs=MLP_INPUTS, trace=False)
    th = make_plan(src, Policy.threshold("80KB"), inputs=MLP_INPUTS, trace=False)
    assert max(s.nbytes for s in th.stages) <= 80_000
    assert eq.num_stages == 3
    with pytest.raises(PlanError, match=r"unit 'blocks\.3' is 66944 bytes"):
        make_plan(src, Policy.threshold("60KB"), inputs=MLP_INPUTS, trace=False)


def test_schedule_fill_drain():
    sched = fill_drain(3, 4)
    validate(sched)
    grid = render(sched).splitlines()
    assert grid[0].split()[2:4] == ["0", "1"] and grid[2].split()[2:4] == [".", "."]
    sched[1][3], sched[1][0] = sched[1][0], sched[1][3]
    with pytest.raises(ValueError, match="stage 1: expected 1R0"):
        validate(sched)


def test_transport_header_roundtrip():
    values = [
        torch.zeros(2, 3, dtype=torch.bfloat16),
        7,
        None,
        True,
        2.5,
        (torch.ones(1, dtype=torch.bool), -3),
        torch.empty(0, 4),
    ]
    header, tensors = encode_header(values)
    decoded, specs = decode_header(header)
    assert [s[1] for s in specs] == [[2, 3], [1], [0, 4]]
    assert decoded[1:5] == [7, None, True, 2.5]
    assert len(tensors) == 2  # the empty tensor sends no payload
    header, tensors = encode_header([StageFailure("stage 1 failed: ValueError: ü")])
    (decoded,), _specs = decode_header(header)
    assert type(decoded).__name__ == "_Fail" and len(tensors) == 1


def test_nccl_only_between_distinct_gpus():
    """NCCL refuses two ranks on one GPU and cannot reach a CPU rank: those edges use gloo."""
    from pipeline_core.runtime import nccl_between, nccl_usable

    assert nccl_usable(["cuda:a", "cuda:b", "cuda:c"])
    assert not nccl_usable(["cuda:a", "cuda:a"])  # two stages sharing one GPU
    assert not nccl_usable(["cpu", "cuda:a"])  # a CPU stage beside a GPU stage
    assert not nccl_usable(["cpu", "cpu"])
    store = torch.distributed.HashStore()
    store.set("device/1", "cuda:x")  # the peer already published its GPU
    assert nccl_between(store, 0, 2, "cpu") is False
    assert store.get("device/0") == b"cpu"


def test_save_helper_roundtrip(tmp_path):
    save_safetensors_sharded({"a": torch.ones(2), "b": torch.zeros(3)}, tmp_path, per_file=1)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


class _ReadsItsData(torch.nn.Module):
    """Branches on a value of its own activations, as LED's ``if mask.any():`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) if h.sum() > 0 else h


def test_a_model_that_reads_its_own_data_is_refused_saying_why():
    """The planner runs the model on fake tensors (no weights in memory), which have no values
    to branch on: the refusal says so, not "check the example inputs"."""
    from pipeline_core.errors import TraceError
    from pipeline_core.trace import call_order

    with torch.device("meta"):
        model = _ReadsItsData()
    with pytest.raises(TraceError, match="reads the values of its own tensors") as err:
        call_order(model, [InputSpec(name="x", shape=[2, 4])], ["a", "b"], is_hf=False)
    assert "check the example inputs" not in str(err.value)
