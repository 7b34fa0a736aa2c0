"""The checkpoint's dtype by default (as ``from_pretrained(dtype="auto")``), ``--dtype`` to
override, float32-kept modules, and bytes / KV budgets counted in the dtype."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.cost import Workload
from pipeline_core.gen_stage import GenStage
from pipeline_core.host_arena import HUGE_PAGE, arena_bytes
from pipeline_core.load import CheckpointIndex, read_tensors
from pipeline_core.local_generate import LocalGenerator
from pipeline_core.sampling import SamplingParams
from pipeline_core.source import resolve_dtype

from .models import hf_greedy, hf_model, lm_model, save_hf

PROMPTS = [[5, 9, 2, 31], [17, 3, 3]]


def _plan(ckpt, dtype=None, stages: int = 2):
    return make_plan(
        ModelSource(checkpoint=str(ckpt)),
        Policy.balanced(stages),
        dtype=dtype,
        trace=False,
        workload=Workload(profile=False, kv_tokens=64),
    )


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    model = lm_model("llama", std=0.5).to(torch.bfloat16)
    return save_hf(model, tmp_path_factory.mktemp("llama") / "bf16")


@pytest.mark.slow  # stage processes (LocalGenerator)
def test_bf16_config_plans_loads_and_generates_in_bf16(llama_bf16):
    """config.json says bfloat16: the plan, each stage's tensors and the KV budget are
    bfloat16 (half the float32 bytes), and greedy tokens equal from_pretrained's (auto)."""
    assert json.loads((llama_bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    plan, plan32 = _plan(llama_bf16), _plan(llama_bf16, "float32")
    assert plan.dtype == "bfloat16" and plan32.dtype == "float32"
    ref = AutoModelForCausalLM.from_pretrained(llama_bf16).eval()
    assert ref.dtype == torch.bfloat16
    # parameters at 2 bytes instead of 4 (the tied embedding counted by both its units);
    # buffers (rotary inv_freq) float32 in both
    numel = sum(p.numel() for _, p in ref.named_parameters(remove_duplicate=False))
    assert plan32.total_bytes - plan.total_bytes == 2 * numel
    kv = [s.kv_bytes_per_token for s in plan.stages]
    assert all(k > 0 for k in kv)
    assert 2 * sum(kv) == sum(s.kv_bytes_per_token for s in plan32.stages)
    stage = GenStage(plan, 1)
    owned = [p for n, p in stage.model.named_parameters() if not p.is_meta]
    assert owned and {p.dtype for p in owned} == {torch.bfloat16}
    with LocalGenerator(plan) as gen:
        got = gen.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    want = [hf_greedy(ref, p, 6) for p in PROMPTS]
    assert got == want
    assert len({t for row in want for t in row}) > 2  # the tokens vary: the test can fail


def test_dtype_override_and_float16_config(tmp_path):
    """A float16 config plans as float16; an explicit dtype (name or torch.dtype) wins."""
    ckpt = save_hf(hf_model("opt").to(torch.float16), tmp_path / "opt16")
    source = ModelSource(checkpoint=str(ckpt))
    assert resolve_dtype(source) == torch.float16
    assert resolve_dtype(source, "auto") == torch.float16
    assert resolve_dtype(source, "bf16") == torch.bfloat16
    assert _plan(ckpt).dtype == "float16"
    assert _plan(ckpt, torch.float32).dtype == "float32"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype(source, "float8")


def test_stored_tensors_decide_without_a_config_dtype(tmp_path):
    """No dtype in config.json: the stored tensors' dtype, for .bin and safetensors."""
    model = hf_model("gpt2").to(torch.bfloat16)
    for layout in ("safetensors", "bin"):
        ckpt = save_hf(model, tmp_path / layout, bin_index=layout == "bin")
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg.pop("dtype", None)
        cfg.pop("torch_dtype", None)
        (ckpt / "config.json").write_text(json.dumps(cfg))
        assert CheckpointIndex.open(ckpt).stored_dtype() == torch.bfloat16
        assert _plan(ckpt).dtype == "bfloat16"


def test_fp32_modules_stay_fp32(tmp_path):
    """T5 in float16 keeps its ``wo`` projections in float32 (``_keep_in_fp32_modules``), as
    from_pretrained does; the stage's tensors have exactly from_pretrained's dtypes, buffers
    stay as the model makes them, and the plan counts those tensors at 4 bytes."""
    ckpt = save_hf(hf_model("t5").to(torch.float16), tmp_path / "t5")
    plan = _plan(ckpt, stages=1)
    assert plan.dtype == "float16"
    stage = GenStage(plan, 0)
    ref = AutoModelForSeq2SeqLM.from_pretrained(ckpt)
    want = {n: t.dtype for n, t in ref.state_dict().items()}
    got = {n: t.dtype for n, t in stage.model.state_dict().items()}
    assert got == want
    kept = [n for n, d in want.items() if d == torch.float32]
    assert kept and all(".wo." in n for n in kept)
    distinct = {t.data_ptr(): t.numel() * t.element_size() for t in ref.state_dict().values()}
    assert plan.stages[0].nbytes == sum(distinct.values())


def test_bin_tensors_are_read_from_their_byte_ranges(tmp_path):
    """A .bin shard holding views (a tensor sharing another's storage at an offset, a
    transposed one) reads back equal, each as its own compact tensor."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"a": base, "row": base[2], "t": base.t(), "h": torch.ones(5, dtype=torch.bfloat16)}
    (tmp_path / "ck").mkdir()
    torch.save(state, tmp_path / "ck" / "pytorch_model-00001-of-00001.bin")
    (tmp_path / "ck" / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(state, "pytorch_model-00001-of-00001.bin")})
    )
    index = CheckpointIndex.open(tmp_path / "ck")
    wanted = {k: (k, list(v.shape), v.dtype) for k, v in state.items()}
    out = read_tensors(index, wanted, huge_pages=False)
    for k, v in state.items():
        assert torch.equal(out[k], v) and out[k].dtype == v.dtype
    assert out["row"].untyped_storage().nbytes() == 6 * 4  # not the whole shared storage
    packed = read_tensors(index, wanted)  # default: one region for all (host_arena)
    for k, v in state.items():
        assert torch.equal(packed[k], v) and packed[k].dtype == v.dtype
    region = {t.untyped_storage().data_ptr() for t in packed.values()}
    assert len(region) == 1
    own = arena_bytes(v.numel() * v.element_size() for v in state.values())
    assert packed["a"].untyped_storage().nbytes() <= own + HUGE_PAGE  # each once, compact
