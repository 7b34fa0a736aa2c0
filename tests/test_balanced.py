"""The `balanced` policy: compute (FLOPs from a fake-tensor forward) within worker memory."""

from __future__ import annotations

import pytest

from pipeline_core import ModelSource, PlanError, Policy, make_plan
from pipeline_core import split as sp


@pytest.fixture(scope="module")
def big_head_llama(tmp_path_factory):
    """An output layer (vocab 4000 x 64) costing as much as several decoder layers."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("bighead")
    LlamaConfig(
        vocab_size=4000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        tie_word_embeddings=False,
    ).save_pretrained(path)
    return ModelSource(checkpoint=str(path))


def test_flops_are_counted_per_unit(big_head_llama):
    plan = make_plan(big_head_llama, Policy.equal_size(2), trace=False)
    flops = {u["name"]: u["flops"] for u in plan.units}
    assert flops["model.embed_tokens"] == 0  # a lookup
    assert flops["lm_head"] == 2 * 16 * 64 * 4000  # 2 * tokens * in * out (example: 2 x 8)
    assert flops["model.layers.0"] == flops["model.layers.7"] > 0


def test_balanced_moves_layers_off_the_heavy_last_stage(big_head_llama):
    by_bytes = make_plan(big_head_llama, Policy.equal_size(2), trace=False)
    by_time = make_plan(big_head_llama, Policy.balanced(2), trace=False)
    assert len(by_time.stages[1].units) < len(by_bytes.stages[1].units)
    assert max(s.flops for s in by_time.stages) < max(s.flops for s in by_bytes.stages)


def test_balanced_respects_unequal_memory(big_head_llama):
    total = make_plan(big_head_llama, Policy.equal_size(2), trace=False).total_bytes
    small, large = int(total * 0.4), int(total * 0.7)
    memory = [small, large]
    plan = make_plan(big_head_llama, Policy.balanced(2, memory=memory), trace=False)
    assert sorted(s.worker for s in plan.stages) == [0, 1]
    assert all(s.nbytes <= memory[s.worker] for s in plan.stages)
    with pytest.raises(PlanError, match="missing"):
        make_plan(big_head_llama, Policy.balanced(2, memory=[small, small]), trace=False)


def test_balanced_gives_a_faster_worker_more_work():
    costs = [1.0] * 12
    starts = sp.balanced(costs, [1] * 12, 2, [str(i) for i in range(12)], speeds=[2.0, 1.0])
    assert starts == [0, 8]  # 8 units on the 2x worker, 4 on the other
    with pytest.raises(PlanError, match="one speed and one memory size per stage"):
        sp.balanced(costs, [1] * 12, 2, [str(i) for i in range(12)], speeds=[1.0])
    with pytest.raises(PlanError, match=r"unit '3' \(9 B\) is larger than any worker"):
        sp.balanced(costs[:4], [1, 1, 1, 9], 2, list("0123"), memory=[8, 8])
