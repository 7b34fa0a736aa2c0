"""Heterogeneous workers: the coordinator plans by time over the workers that registered.

Three workers started through the CLI declare unequal speeds and memory (``--speed``,
``--memory``); the default policy (``balanced``) profiles the model's units on one of them,
gives the 3x faster worker about three times the work, keeps every stage within its worker's
memory, and refuses with FAILED_PRECONDITION and the missing amount when weights plus the KV
budget cannot fit.
"""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeserve.v1 import pipeserve_pb2 as pb

from .cluster import Cluster
from .cluster import cli as _cli
from .models import hf_greedy, save_hf

pytestmark = pytest.mark.slow

FAST, SLOW = 300.0, 100.0


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hetero")
    # 12 identical decoder layers and a small head: the split is set by the layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=12,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    save_hf(model, tmp / "model")
    c = Cluster(
        tmp,
        workers=[
            ["--speed", str(FAST), "--memory", "1GiB"],
            ["--speed", str(SLOW), "--memory", "1GiB"],
            ["--speed", str(SLOW), "--memory", "3MiB"],
        ],
    )
    c.ckpt = tmp / "model"
    c.model = model
    try:
        yield c
    finally:
        c.close()


def _plan(c: Cluster, stages: int = 2, **workload) -> tuple[pb.PlanModelResponse, dict]:
    r = c.admin.PlanModel(
        pb.PlanModelRequest(
            checkpoint=str(c.ckpt),
            policy=pb.SplitPolicy(balanced=stages),
            workload=pb.Workload(**workload),
        ),
        timeout=300,
    )
    return r, json.loads(r.plan_json)


def test_registration_reports_speed_and_memory(hetero):
    workers = hetero.status().workers
    assert sorted(w.speed_gflops for w in workers) == [SLOW, SLOW, FAST]
    assert sorted(w.memory_bytes for w in workers) == [3 * 2**20, 2**30, 2**30]
    assert all(w.device_name for w in workers)


def test_faster_worker_gets_about_three_times_the_work(hetero):
    r, plan = _plan(hetero)
    speed = {w.id: w.speed_gflops for w in hetero.status().workers}
    assert r.times_from.startswith("worker ")  # profiled on a worker, not estimated here
    assert {speed[s.worker_id] for s in r.stages} == {FAST, SLOW}
    layers = {
        speed[s.worker_id]: sum(u.startswith("model.layers.") for u in s.units) for s in r.stages
    }
    assert layers[FAST] + layers[SLOW] == 12
    assert layers[FAST] >= 2 * layers[SLOW], layers  # 3x the speed: ~9 of 12 layers
    # (the two slow workers differ in memory: with the 3 MiB one, KV for 1000 tokens per
    # layer still fits, and it simply takes fewer layers)
    # no other split point or worker order that fits the workers' memory (weights + KV budget)
    # makes the slowest stage faster (the plan's own profiled unit times; stage times are
    # divided by their worker's relative speed)
    sec = [u["seconds"] for u in plan["units"]]
    need = [
        u["nbytes"] + u["kv_bytes_per_token"] * plan["workload"]["kv_tokens"] for u in plan["units"]
    ]
    speeds, memory = plan["policy"]["speeds"], plan["policy"]["memory"]
    slowest = max(s["seconds"] for s in plan["stages"])
    for k in range(1, len(sec)):
        for a, b in ((0, 1), (1, 0)):
            if sum(need[:k]) <= memory[a] and sum(need[k:]) <= memory[b]:
                other = max(sum(sec[:k]) / speeds[a], sum(sec[k:]) / speeds[b])
                assert slowest <= other * (1 + 1e-9), (k, a, b)
    assert r.samples_per_s > 0 and 0 < r.bubble < 1 and r.streaming_samples_per_s > 0
    assert plan["policy"]["kind"] == "balanced"


def test_plan_respects_memory_and_says_what_is_missing(hetero):
    # all 3 workers: the 3 MiB one holds at most 3 MiB of this ~9 MiB model
    r, _ = _plan(hetero, stages=3)
    mem = {w.id: w.memory_bytes for w in hetero.status().workers}
    assert len({s.worker_id for s in r.stages}) == 3
    assert all(s.bytes <= mem[s.worker_id] for s in r.stages)
    small = next(s for s in r.stages if mem[s.worker_id] == 3 * 2**20)
    assert 0 < small.bytes <= 3 * 2**20
    # weights + a KV budget of 2M tokens (6 KiB/token over 12 layers) cannot fit 2 workers
    with pytest.raises(grpc.RpcError) as e:
        _plan(hetero, kv_tokens=2_000_000)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "missing" in e.value.details() and "KV cache" in e.value.details()


def test_admin_cli_shows_the_plan_and_load_follows_it(hetero):
    status = _cli("admin", "status", "--coordinator", hetero.address)
    assert status.returncode == 0 and "GFLOP/s" in status.stdout and "300" in status.stdout
    out = _cli("admin", "plan", str(hetero.ckpt), "--stages", "2", "--coordinator", hetero.address)
    assert out.returncode == 0, out.stderr
    assert (
        "est. ms" in out.stdout and "predicted" in out.stdout and "times from worker" in out.stdout
    )
    r, _ = _plan(hetero)
    load = _cli(
        "admin",
        "load",
        str(hetero.ckpt),
        "--name",
        "m",
        "--stages",
        "2",
        "--coordinator",
        hetero.address,
    )
    assert load.returncode == 0, load.stderr
    try:
        st = {w.id: w for w in hetero.status().workers}
        for s in r.stages:  # each stage runs on the worker the plan chose
            assert st[s.worker_id].model == "m" and st[s.worker_id].stage == s.stage
        assert hetero.generate("m", [5, 6, 7], 12) == hf_greedy(hetero.model, [5, 6, 7], 12)
    finally:
        hetero.admin.UnloadModel(pb.UnloadModelRequest(name="m"), timeout=60)


def test_recovery_gives_a_lost_stage_to_a_spare_that_fits(tmp_path):
    from coordinator.placement import spare_for as _spare_for
    from coordinator.records import WorkerRecord
    from pipeline_core import ModelSource, Policy, Workload, make_plan

    LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
    ).save_pretrained(tmp_path)
    w = Workload(profile=False, kv_tokens=1000)
    plan = make_plan(
        ModelSource(checkpoint=str(tmp_path)), Policy.equal_size(2), trace=False, workload=w
    )
    st = plan.stages[1]
    need = st.nbytes + st.kv_bytes_per_token * 1000
    small = WorkerRecord("a", "h:1", "cpu", need - 1, None, seq=1)
    big = WorkerRecord("b", "h:2", "cpu", need, None, seq=2)
    assert _spare_for(plan, 1, [small, big]) is big  # registered later, but it fits
    assert _spare_for(plan, 1, [small]) is small  # none fits: the biggest, and the load says
