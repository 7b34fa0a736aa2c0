"""CI's scaled-down case of the 7B benchmark (``bench/bench_scale.py``): a few-hundred-MB
bf16 ``.bin`` index checkpoint, 3 stages, each loaded in its own process: the stages are in the
checkpoint's dtype and each one's peak RSS growth while loading is at most 1.10x its bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.bench_scale import config_of, write_checkpoint
from pipeline_core import ModelSource, Policy, Workload, make_plan

SHAPE = dict(
    model_type="bloom",
    architectures=["BloomForCausalLM"],
    vocab_size=50000,
    hidden_size=1024,
    n_layer=6,
    n_head=16,
    dtype="bfloat16",
)


@pytest.mark.slow
def test_bf16_bin_index_stages_load_in_their_bytes(tmp_path):
    path = tmp_path / "bloom-small"
    total = write_checkpoint(config_of(SHAPE), path, "bin", shards=4)
    assert total > 200e6 and (path / "pytorch_model.bin.index.json").is_file()
    plan = make_plan(
        ModelSource(checkpoint=str(path)),
        Policy.balanced(3),
        trace=False,
        workload=Workload(profile=False),
    )
    assert plan.dtype == "bfloat16"
    # the tied embedding / head: loaded by the first and the last stage, said in the plan
    assert plan.tied and sum(s.nbytes for s in plan.stages) > total
    (tmp_path / "plan.json").write_text(plan.dumps())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in range(3):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.bench_scale",
                "probe",
                str(tmp_path / "plan.json"),
                str(k),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["dtypes"] == [str(torch.bfloat16)], r
        assert r["bytes_read"] == plan.stages[k].nbytes, r
        assert r["ratio"] <= 1.10, f"stage {k} grew {r['ratio']:.3f}x its bytes: {r}"
