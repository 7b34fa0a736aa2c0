"""The `pipeserve plan` command: table, JSON, units, and clear errors."""

from __future__ import annotations

import json
import re

import pytest

from pipeline_core import ModelSource, Policy, SamplingParams, Workload, make_plan
from pipeserve.cli import build_parser, main
from pipeserve.cli.flags import policy_from_args, sampling_from_args, workload_from_args
from pipeserve.codec import (
    generate_request,
    policy_from_proto,
    policy_to_proto,
    sampling_from_proto,
    workload_from_proto,
    workload_to_proto,
)
from pipeserve.plan_table import format_plan, stage_shares

from .models import hf_greedy, hf_model, save_hf


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_hf(hf_model("gpt2"), tmp_path_factory.mktemp("gpt2"))


def test_plan_table_and_json(gpt2_dir, capsys):
    assert main(["plan", str(gpt2_dir), "--equal-size", "3"]) == 0
    table = capsys.readouterr().out
    assert "equal_size(3)" in table
    rows = table.split("send  units\n", 1)[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in rows] == ["0", "1", "2"]
    assert "predicted: one batch of 8 in 4 microbatches" in table and "bubble" in table
    assert "   -     -  " in rows[1], "untraced (the default): stage I/O not recorded"
    assert main(["plan", str(gpt2_dir), "--split-at", "transformer.h.2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["version"] == 1 and len(plan["stages"]) == 2
    assert plan["stages"][1]["units"][0] == "transformer.h.2"
    assert not plan["stages"][1]["receives"]
    assert main(["plan", str(gpt2_dir), "--split-at", "transformer.h.2", "--trace"]) == 0
    rows = capsys.readouterr().out.split("send  units\n", 1)[1].splitlines()
    assert "   -     -  " not in rows[1], "--trace records what each stage receives and sends"
    assert main(["plan", str(gpt2_dir), "--split-at", "transformer.h.2", "--trace", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"][1]["receives"], "traced plans record stage inputs"


def test_plan_units_and_threshold(gpt2_dir, capsys):
    assert main(["plan", str(gpt2_dir), "--units"]) == 0
    units = capsys.readouterr().out.splitlines()
    assert units[0].endswith("transformer.wte") and units[-1].endswith("lm_head")
    assert main(["plan", str(gpt2_dir), "--threshold", "100KB"]) == 0
    assert "threshold(100000 bytes)" in capsys.readouterr().out
    assert main(["plan", str(gpt2_dir), "--balanced", "2", "--stage-speed", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "balanced(2) by time" in out and "%" in out
    assert main(["plan", str(gpt2_dir), "--json"]) == 0  # the default policy
    plan = json.loads(capsys.readouterr().out)
    assert plan["policy"]["kind"] == "balanced" and len(plan["stages"]) == 2
    assert plan["estimate"]["bubble"] > 0 and all(s["seconds"] > 0 for s in plan["stages"])


def test_plan_errors_are_clear(gpt2_dir, tmp_path, capsys):
    assert main(["plan", str(gpt2_dir), "--threshold", "1KB"]) == 2
    assert "larger than the threshold" in capsys.readouterr().err
    assert main(["plan", str(gpt2_dir), "--split-at", "transformer.h.9"]) == 2
    assert "unknown split point 'transformer.h.9'" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "nowhere")]) == 2
    assert "config.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", str(gpt2_dir), "--equal-size", "2", "--threshold", "1MB"])


def test_policy_flags_map_once_to_the_policy_and_its_proto():
    """The same flags give the same Policy for `plan` and `admin`; a policy survives the trip
    to the coordinator's proto and back; two policies at once are refused."""
    parser = build_parser()
    cases = [
        (["--equal-size", "3"], Policy.equal_size(3)),
        (["--threshold", "1MB"], Policy.threshold(10**6)),
        (["--split-at", "a.0,b.1"], Policy.manual(["a.0", "b.1"])),
        (["--stages", "2"], Policy.balanced(2)),
    ]
    for flags, want in cases:
        admin = policy_from_args(parser.parse_args(["admin", "load", "ckpt", *flags]), 0)
        plan = policy_from_args(parser.parse_args(["plan", "ckpt", *flags]), 2)
        assert admin == plan == want, flags
        assert policy_from_proto(policy_to_proto(want)) == want
    # no policy flag: balanced over the command's default (admin: one stage per idle worker)
    assert policy_from_args(parser.parse_args(["admin", "load", "ckpt"]), 0) == Policy.balanced(0)
    assert policy_from_args(parser.parse_args(["plan", "ckpt"]), 2) == Policy.balanced(2)
    args = parser.parse_args(["plan", "ckpt", "--stages", "2", "--stage-speed", "1,3"])
    assert policy_from_args(args, 2).speeds == [1.0, 3.0]
    with pytest.raises(SystemExit):
        policy_from_args(
            parser.parse_args(["admin", "load", "x", "--equal-size", "2", "--stages", "2"]), 0
        )
    with pytest.raises(ValueError, match="markers"):
        policy_to_proto(Policy.markers())


def test_sampling_and_workload_defaults_are_the_domain_objects():
    parser = build_parser()
    for argv in (
        ["generate", "--model", "m", "--prompt-ids", "1"],
        ["run", "ckpt", "--prompt-ids", "1"],
    ):
        assert sampling_from_args(parser.parse_args(argv)) == SamplingParams(), argv
    w = workload_from_args(parser.parse_args(["plan", "ckpt"]))
    assert w == Workload()
    assert workload_from_proto(workload_to_proto(w)) == Workload(profile=True)
    args = parser.parse_args(
        ["generate", "--model", "m", "--prompt-ids", "4,5", "--max-new-tokens", "7",
         "--temperature", "0.5", "--top-k", "3", "--top-p", "0.5", "--seed", "11"]
    )  # fmt: skip
    params = sampling_from_args(args)
    req = generate_request("m", params, token_ids=[4, 5])
    assert list(req.token_ids.ids) == [4, 5] and sampling_from_proto(req) == params
    # an unset max_new_tokens on the wire is SamplingParams' default
    req.max_new_tokens = 0
    assert sampling_from_proto(req).max_new_tokens == SamplingParams().max_new_tokens


def test_one_plan_formatter_with_workers_and_shares(gpt2_dir):
    plan = make_plan(
        ModelSource(checkpoint=str(gpt2_dir)),
        Policy.equal_size(2),
        trace=False,
        workload=Workload(profile=False),
    )
    shares = stage_shares(plan)
    assert len(shares) == 2 and abs(sum(shares) - 1) < 1e-9 and min(shares) > 0
    text = format_plan(plan, workers=["w7", ""], times_from="worker w7 (cpu)")
    assert "times from worker w7 (cpu)" in text and "worker" in text.split("\n\n")[1]
    rows = text.split("send  units\n", 1)[1].split("\n\n")[0].splitlines()
    assert [r.split()[:2] for r in rows] == [["0", "w7"], ["1", "-"]]
    assert f"{100 * shares[0]:.1f}%" in rows[0]


_greedy = hf_greedy


@pytest.mark.slow
def test_run_one_shot_generation(tmp_path, capsys):
    from .models import lm_model

    model = lm_model("gpt2")
    ckpt = save_hf(model, tmp_path / "gpt2")
    args = ["run", str(ckpt), "--stages", "2", "--prompt-ids", "3,4,5", "--max-new-tokens", "12"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["token_ids"][:12] == _greedy(model, [3, 4, 5], 12)[: len(out["token_ids"])]
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": len(out["token_ids"])}


@pytest.mark.slow
def test_local_cluster_self_check(tmp_path):
    import subprocess
    import sys

    from .models import lm_model

    ckpt = save_hf(lm_model("llama"), tmp_path / "llama")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeserve",
            "local",
            str(ckpt),
            "--stages",
            "2",
            "--port",
            "0",
            "--once",
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "same tokens as single-process transformers generate" in r.stdout
    lines = r.stdout.splitlines()
    # the reference model is computed (and freed) before any worker starts: the host holds
    # the model once at a time, not the whole model beside its stages
    first = next(i for i, ln in enumerate(lines) if ln.startswith("reference:"))
    started = next(i for i, ln in enumerate(lines) if "workers started" in ln)
    assert first < started
    got = [ln for ln in lines if "-> [" in ln]
    assert len(got) == 3 and all(len(ln.split("-> [")[1].split(",")) == 6 for ln in got)
    assert sum("s/token" in ln for ln in lines) == 3
    assert "pipeserve generate --coordinator" in r.stdout and "grpcurl" in r.stdout


@pytest.mark.slow
def test_run_under_torchrun(tmp_path):
    """PiPPy users' workflow: torchrun --nproc_per_node 2 pipeserve run (rank k = stage k)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from .models import lm_model

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    model = lm_model("llama")
    ckpt = save_hf(model, tmp_path / "llama")
    r = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "-m",
            "pipeserve",
            "run",
            str(ckpt),
            "--prompt-ids",
            "3,4,5",
            "--max-new-tokens",
            "12",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    assert out["token_ids"] == _greedy(model, [3, 4, 5], 12)[: len(out["token_ids"])]
    assert len(out["token_ids"]) == 12 or out["finish_reason"] == "stop"


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_run_failure_in_a_unit_is_one_clear_line(tmp_path, capfd, monkeypatch):
    """A step that fails inside a layer: one line naming the stage and the unit, exit 1, no
    traceback (and no JSON result); ``--debug`` shows the traceback.  Stages in this process
    (``--in-process``) so the failure can be planted in one layer."""
    import torch
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    forward = GPT2Block.forward

    def failing(self, hidden_states, *args, **kwargs):
        real = type(hidden_states) is torch.Tensor and not hidden_states.is_meta  # not planning
        if self.attn.layer_idx == 3 and real:
            raise RuntimeError("planted failure")
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(GPT2Block, "forward", failing)
    ckpt = save_hf(hf_model("gpt2"), tmp_path / "gpt2")
    args = ["run", str(ckpt), "--stages", "2", "--prompt-ids", "3,4,5", "--in-process"]
    assert main([*args, "--json"]) == 1
    out, err = capfd.readouterr()
    assert not out.strip() and "Traceback" not in err
    (line,) = _error_lines(err)
    assert re.fullmatch(
        r"error: generation failed: stage 1, unit transformer\.h\.3: RuntimeError: planted "
        r"failure \(--debug shows the traceback\)",
        line,
    ), line
    assert main([*args, "--debug"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and "planted failure" in err and len(_error_lines(err)) == 1


@pytest.mark.slow
def test_run_stage_that_cannot_load_is_one_clear_line(tmp_path, capfd):
    """A stage process that fails to load its shard (a tensor of the wrong shape): one line
    naming the stage and the tensor, exit 1."""
    from safetensors.torch import load_file, save_file

    ckpt = save_hf(hf_model("gpt2"), tmp_path / "gpt2", shard="2MB")
    bad = "transformer.h.3.mlp.c_fc.weight"
    for f in ckpt.glob("*.safetensors"):
        tensors = load_file(f)
        if bad in tensors:
            tensors[bad] = tensors[bad][:, :-1].contiguous()
            save_file(tensors, f, metadata={"format": "pt"})
    args = ["run", str(ckpt), "--stages", "2", "--prompt-ids", "3,4,5"]
    assert main(args) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    assert "stage 1 failed to start: CheckpointError" in line and bad in line, line
