"""The `balanced` policy and its cost model: unit times (profiled, cached, or FLOPs), KV bytes
per token, worker memory and speed, predicted throughput."""

from __future__ import annotations

import pytest

from pipeline_core import DoesNotFit, ModelSource, PlanError, Policy, Workload, make_plan
from pipeline_core import split as sp
from pipeline_core.plan import predict


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
    # profiled at 32 x 32 tokens: there the head measures 2-5 decoder layers even with four
    # processes on the 2 cores; at the default 2 x 128 a layer of this tiny model is mostly
    # Python and attention, and on a loaded CI machine the head once measured about one layer
    w = Workload(batch=32, seq=32, chunks=1)
    by_time = make_plan(big_head_llama, Policy.balanced(2), trace=False, workload=w)
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


# --------------------------------------------------------------------------- the cost model


def test_units_are_profiled_once_per_kind_without_weights(big_head_llama, tmp_path, monkeypatch):
    """The fixture has config.json only: profiling runs random weights of each unit's shape."""
    from pipeline_core import cost

    cache = tmp_path / "profiles.json"
    runs = []
    real = cost._profile_kind
    monkeypatch.setattr(cost, "_profile_kind", lambda *a: runs.append(a) or real(*a))
    w = Workload(batch=4, seq=32, chunks=2)
    plan = make_plan(
        big_head_llama, Policy.balanced(2), trace=False, workload=w, profile_cache=cache
    )
    units = {u["name"]: u for u in plan.units}
    assert {u["cost"] for u in plan.units} == {"profile"}
    kinds = {type(a[0]).__name__ for a in runs}
    assert len(runs) == len(kinds)  # one run per kind: 8 decoder layers cost one profile
    assert units["model.layers.0"]["seconds"] == units["model.layers.7"]["seconds"] > 0
    assert units["lm_head"]["flops_workload"] == 2 * 2 * 32 * 64 * 4000  # microbatch 2 x 32
    # planning again reads the cache: nothing runs
    runs.clear()
    again = make_plan(
        big_head_llama, Policy.balanced(2), trace=False, workload=w, profile_cache=cache
    )
    assert not runs and {u["cost"] for u in again.units} == {"cache"}
    assert again.split_points == plan.split_points


def test_flops_fallback_and_kv_bytes(big_head_llama):
    w = Workload(profile=False, kv_tokens=100)
    plan = make_plan(big_head_llama, Policy.equal_size(2), trace=False, workload=w)
    units = {u["name"]: u for u in plan.units}
    assert {u["cost"] for u in plan.units} == {"flops"}
    ratio = units["lm_head"]["seconds"] / units["model.layers.0"]["seconds"]
    assert ratio == pytest.approx(
        units["lm_head"]["flops_workload"] / units["model.layers.0"]["flops_workload"]
    )
    # Llama: K and V, 4 heads x 16 dims, fp32, per token per layer; embedding/head hold none
    assert units["model.layers.3"]["kv_bytes_per_token"] == 2 * 4 * 16 * 4
    assert units["lm_head"]["kv_bytes_per_token"] == 0
    assert sum(s.kv_bytes_per_token for s in plan.stages) == 8 * 2 * 4 * 16 * 4


def test_kv_budget_counts_against_worker_memory(big_head_llama):
    total = make_plan(big_head_llama, Policy.equal_size(1), trace=False).total_bytes
    memory = [total, total]  # the weights fit twice over ...
    ok = make_plan(big_head_llama, Policy.balanced(2, memory=memory), trace=False)
    assert ok.num_stages == 2
    kv_per_token = 8 * 2 * 4 * 16 * 4
    tokens = 3 * total // kv_per_token  # ... but not next to this KV cache
    w = Workload(profile=False, kv_tokens=tokens)
    with pytest.raises(DoesNotFit, match=r"missing.*KV cache .* for \d+ tokens"):
        make_plan(big_head_llama, Policy.balanced(2, memory=memory), trace=False, workload=w)


def test_predicted_throughput_and_bubble():
    e = predict([1.0, 1.0], Workload(batch=8, chunks=4))
    assert e["batch_seconds"] == 5.0  # 2 stages + 3 more microbatches at the slowest pace
    assert e["bubble"] == pytest.approx(1 - 8 / 10)
    assert e["samples_per_s"] == pytest.approx(8 / 5) and e["streaming_samples_per_s"] == 2.0
    uneven = predict([1.0, 2.0], Workload(batch=8, chunks=4))
    assert uneven["batch_seconds"] == 9.0 and uneven["streaming_samples_per_s"] == 1.0


def test_unequal_workers_get_the_best_order():
    # a huge first unit (an embedding) only fits the big worker, which is listed second
    costs, sizes = [0.0] + [1.0] * 8, [10] + [1] * 8
    order, starts = sp.balanced_order(
        costs, sizes, 2, [str(i) for i in range(9)], memory=[8, 20], speeds=[1.0, 1.0]
    )
    assert order == [1, 0] and starts == [0, 5]
    # a 3x faster worker takes about three quarters of the work
    order, starts = sp.balanced_order(
        [1.0] * 12, [1] * 12, 2, [str(i) for i in range(12)], speeds=[1.0, 3.0]
    )
    per_worker = {order[0]: starts[1], order[1]: 12 - starts[1]}
    assert per_worker == {1: 9, 0: 3}


def test_absurd_stage_counts_fail_fast():
    """A fuzzed request once asked for 2**31 stages: the lists sized by n must not be built."""
    for n in (0, -1, 2**31 - 1):
        with pytest.raises(PlanError, match="stages"):
            sp.balanced_order([1.0] * 4, [1] * 4, n, list("abcd"))


def test_balanced_order_is_optimal_against_brute_force():
    """Every split point and worker order tried: nothing beats the planner's slowest stage."""
    import itertools
    import random

    rng = random.Random(1)
    for _ in range(300):
        n, m = rng.choice([2, 3]), rng.randint(3, 8)
        n = min(n, m)
        costs = [rng.random() for _ in range(m)]
        sizes = [rng.randint(1, 5) for _ in range(m)]
        speeds = [rng.choice([1.0, 1 / 3, 2.0]) for _ in range(n)]
        memory = [rng.randint(6, 30) for _ in range(n)]
        names = [str(i) for i in range(m)]
        best = None
        for perm in itertools.permutations(range(n)):
            for cuts in itertools.combinations(range(1, m), n - 1):
                starts, ends = [0, *cuts], [*cuts, m]
                if all(
                    sum(sizes[a:b]) <= memory[w] for a, b, w in zip(starts, ends, perm, strict=True)
                ):
                    t = sp.slowest(costs, starts, [speeds[w] for w in perm])
                    best = t if best is None else min(best, t)
        if best is None:
            with pytest.raises(DoesNotFit):
                sp.balanced_order(costs, sizes, n, names, memory=memory, speeds=speeds)
            continue
        order, starts = sp.balanced_order(costs, sizes, n, names, memory=memory, speeds=speeds)
        ends = [*starts[1:], m]
        assert len(starts) == n and sorted(order) == list(range(n))
        assert all(
            sum(sizes[a:b]) <= memory[w] for a, b, w in zip(starts, ends, order, strict=True)
        )
        assert sp.slowest(costs, starts, [speeds[w] for w in order]) <= best * (1 + 1e-6)
