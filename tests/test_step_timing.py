"""Per-step time breakdown of generation stages (issue 23): off by default, exact token
streams either way, and each stage's categories account for its wall time."""

from __future__ import annotations

import time

import pytest

from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.local_generate import LocalGenerator
from pipeline_core.sampling import SamplingParams
from pipeline_core.stage_options import StageOptions
from pipeline_core.step_timing import CATEGORIES, TIMING_FIELDS, breakdown

from .models import hf_greedy_batch, lm_model, save_hf

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]
NEW = 8
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


def _plan(tmp_path, stages: int):
    model = lm_model("llama")
    ckpt = save_hf(model, tmp_path / "llama")
    return model, make_plan(
        ModelSource(checkpoint=str(ckpt)), Policy.equal_size(stages), trace=False
    )


TIMED = StageOptions(step_timing=True)


def test_timing_is_off_by_default(tmp_path):
    model, plan = _plan(tmp_path, 2)
    with LocalGenerator(plan, in_process=True) as gen:
        assert gen.generate(PROMPTS, GREEDY) == hf_greedy_batch(model, PROMPTS, NEW)
        stats = gen.stats()
    assert all(s[k] == 0 for s in stats for k in TIMING_FIELDS)


def test_timing_counts_every_step_in_process(tmp_path):
    model, plan = _plan(tmp_path, 2)
    with LocalGenerator(plan, in_process=True, options=TIMED) as gen:
        assert gen.generate(PROMPTS, GREEDY) == hf_greedy_batch(model, PROMPTS, NEW)
        first, last = gen.stats()
    for s in (first, last):
        assert s["t_steps"] == s["steps"] == first["steps"] >= NEW  # every step, counted once
        assert 0 < s["t_compute_us"] < s["t_step_us"]
        # CPU time inside the units: some, and never more than their wall time (one thread)
        assert 0 < s["t_compute_cpu_us"] <= s["t_compute_us"] + 1000
    assert last["t_sample_us"] > 0 and first["t_sample_us"] == 0
    assert first["t_loop_us"] >= first["t_step_us"]  # stage 0's loop holds its steps


@pytest.mark.slow
def test_breakdown_accounts_for_wall_time(tmp_path):
    """Across processes: every stage's categories sum to the wall time per step."""
    _, plan = _plan(tmp_path, 2)
    params = SamplingParams(max_new_tokens=41, ignore_eos=True)
    with LocalGenerator(plan, options=TIMED) as gen:  # the spawned stage gets it too
        gen.generate([PROMPTS[0]], GREEDY)
        s0 = gen.stats()
        t0 = time.perf_counter()
        gen.generate([PROMPTS[0]], params)
        wall = time.perf_counter() - t0
        s1 = gen.stats()
    per_step_ms = wall / 41 * 1e3
    for a, b in zip(s0, s1, strict=True):
        d = breakdown(a, b, steps=41)
        assert set(CATEGORIES) <= set(d)
        assert d["compute"] > 0 and d["stage_py"] > 0
        assert 0 < d["compute_cpu"] <= d["compute"] * 1.01 + 0.05
        assert d["total"] == pytest.approx(per_step_ms, rel=0.25)
    assert breakdown(s0[0], s1[0], steps=41)["wait"] > 0  # stage 0 waits for stage 1


def test_stage_options_from_env():
    """The edge reads the environment (pipeline_core does not): timing off and CUDA IPC on
    unless asked otherwise."""
    from pipeserve.cli.flags import stage_options_from_env

    assert stage_options_from_env({}) == StageOptions(step_timing=False, cuda_ipc=True)
    env = {"PIPESERVE_STEP_TIMING": "1", "PIPESERVE_CUDA_IPC": "0"}
    assert stage_options_from_env(env) == StageOptions(step_timing=True, cuda_ipc=False)
