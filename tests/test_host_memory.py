"""Refuse before reading a byte: ``pipeserve run`` / ``local`` check the host's memory."""

from __future__ import annotations

import pytest
import torch

import pipeline_core
from pipeline_core import ModelSource, Policy, Workload, make_plan
from pipeline_core import host_memory as hm
from pipeline_core.errors import DoesNotFit
from pipeserve import cli, launch
from pipeserve.cli import local as local_cluster

from .models import lm_model, save_hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_hf(lm_model("llama").to(torch.bfloat16), tmp_path_factory.mktemp("hm") / "ll")


def _never(*_a, **_k):
    raise AssertionError("a stage was started although the host cannot hold the stages")


def test_available_memory_reads_this_host():
    have = hm.available_memory()
    assert have is not None
    avail, where = have
    assert avail > 0 and where


def test_need_counts_weights_kv_and_runtime_in_the_plan_dtype(ckpt, monkeypatch):
    plan = make_plan(
        ModelSource(checkpoint=str(ckpt)),
        Policy.equal_size(2),
        trace=False,
        workload=Workload(profile=False),
    )
    need = hm.host_need(plan, kv_tokens=100)
    per_token = sum(s.kv_bytes_per_token for s in plan.stages)
    assert plan.dtype == "bfloat16" and per_token > 0
    assert need["weights"] == sum(s.nbytes for s in plan.stages)
    assert need["kv"] == 100 * per_token
    assert need["total"] == need["weights"] + need["kv"] + 2 * hm.RUNTIME_BASELINE
    hm.check_host_fits(plan, 100)  # this host holds a tiny model
    monkeypatch.setattr(hm, "available_memory", lambda: (need["total"] - 1, "available RAM"))
    with pytest.raises(DoesNotFit, match=r"1 B missing"):
        hm.check_host_fits(plan, 100)


def test_run_refuses_in_one_line_before_loading(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(hm, "available_memory", lambda: (2**20, "available RAM"))
    monkeypatch.setattr(pipeline_core, "LocalGenerator", _never)
    argv = ["run", str(ckpt), "--stages", "2", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "bfloat16" in err and "1.0 MiB available RAM" in err and "missing" in err


def test_local_refuses_before_starting_workers(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(hm, "available_memory", lambda: (2**20, "left under the cgroup"))
    monkeypatch.setattr(launch.subprocess, "Popen", _never)
    assert local_cluster.run_local(ckpt, stages=2, once=True) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the 2 stages need") and "cgroup" in err
