"""The opt-in compiled decode step (issue 23, item 3): greedy tokens equal to eager stages and
to ``transformers`` ``generate`` (fp32), one graph per bucket met (shared by every layer and
stage), and an eager fallback that never fails a request."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.compiled_step import CompileSettings
from pipeline_core.local_generate import LocalGenerator
from pipeline_core.sampling import SamplingParams
from pipeline_core.stage_options import StageOptions
from pipeline_core.static_cache import bucket_layer_class, len_bucket, row_bucket

from .models import hf_greedy_batch, lm_model, save_hf

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [3, 4, 5, 6, 7, 8, 9, 10]]
NEW = 14  # 5 + 13 and 8 + 13 cached tokens: both cross the 16-token bucket into 32
SETTINGS = CompileSettings(row_buckets=(4,), min_len=16)  # batch 1 padded to 4 rows too
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


def _plan(tmp_path, family: str, stages: int):
    model = lm_model(family)
    ckpt = save_hf(model, tmp_path / family)
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(stages), trace=False)
    return model, plan


def _stages(gen: LocalGenerator) -> list:
    eng = gen._engine()
    return [eng.stage, *getattr(eng.ring, "stages", [])]


@pytest.mark.slow  # in one process, but Inductor takes 10-40 s a bucket on 2 shared cores
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compiled_tokens_equal_eager_and_generate(tmp_path, family):
    model, plan = _plan(tmp_path, family, 2)
    graphs0 = counters["stats"]["unique_graphs"]
    compiled = StageOptions(compile_decode=SETTINGS)
    with (
        LocalGenerator(plan, in_process=True, options=compiled) as gen,
        LocalGenerator(plan, in_process=True) as eager,
    ):
        for prompts in ([PROMPTS[0]], PROMPTS):  # batch 1, then 3 rows of different lengths
            want = hf_greedy_batch(model, prompts, NEW)
            assert gen.generate(prompts, GREEDY) == want
            assert eager.generate(prompts, GREEDY) == want
        stages = _stages(gen)
        for s in stages:
            assert s.compiled is not None and s.compiled.off is None
            # every decode step of every owned layer ran compiled (the groups the scheduler
            # formed, merged groups too; the first moves the prefill's cache into a bucket)
            assert s.compiled.eager_steps == 0
            assert s.compiled.compiled_steps >= 2 * (NEW - 1) * len(s.owned_layers)
    layer = _layer_class(model)
    buckets = {(layer, 4, 16), (layer, 4, 32)}
    assert all(set(s.compiled.compile_s) == buckets for s in stages)
    # one graph per bucket, shared by every layer of both stages
    assert counters["stats"]["unique_graphs"] - graphs0 == len(buckets)


def _layer_class(model) -> str:
    return {"LlamaForCausalLM": "LlamaDecoderLayer", "GPT2LMHeadModel": "GPT2Block"}[
        type(model).__name__
    ]


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    """A family that cannot be compiled runs eager with one log line; no request fails."""

    def cannot_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("graph break: unsupported op")

        return run

    monkeypatch.setattr(torch, "compile", cannot_compile)
    model, plan = _plan(tmp_path, "llama", 2)
    with caplog.at_level(logging.WARNING, logger="pipeline_core.compiled_step"):
        opts = StageOptions(compile_decode=SETTINGS)
        with LocalGenerator(plan, in_process=True, options=opts) as gen:
            for prompts in ([PROMPTS[0]], PROMPTS):
                assert gen.generate(prompts, GREEDY) == hf_greedy_batch(model, prompts, NEW)
            stages = _stages(gen)
    assert all(s.compiled.off and "graph break" in s.compiled.off for s in stages)
    assert all(s.compiled.compiled_steps == 0 for s in stages)
    lines = [r for r in caplog.records if "compiled decode off" in r.getMessage()]
    assert len(lines) == len(stages)  # once per stage, not per step


def test_encoder_decoder_stays_eager(tmp_path, caplog):
    model, plan = _plan(tmp_path, "t5", 2)
    with caplog.at_level(logging.INFO, logger="pipeline_core.compiled_step"):
        opts = StageOptions(compile_decode=SETTINGS)
        with LocalGenerator(plan, in_process=True, options=opts) as gen:
            assert gen.generate(PROMPTS, GREEDY) == hf_greedy_batch(model, PROMPTS, NEW)
            assert all(s.compiled is None for s in _stages(gen))
    assert any("encoder-decoder" in r.getMessage() for r in caplog.records)


def test_sliding_window_layers_stay_eager(tmp_path, caplog):
    """A cache layer that is not a plain full-attention one (Mistral's sliding window) keeps
    its own kind and decodes eager, said once per stage."""
    model, plan = _plan(tmp_path, "mistral", 2)
    with caplog.at_level(logging.INFO, logger="pipeline_core.compiled_step"):
        opts = StageOptions(compile_decode=SETTINGS)
        with LocalGenerator(plan, in_process=True, options=opts) as gen:
            assert gen.generate(PROMPTS, GREEDY) == hf_greedy_batch(model, PROMPTS, NEW)
            stages = _stages(gen)
    assert all(s.compiled.compiled_steps == 0 < s.compiled.eager_steps for s in stages)
    said = [r for r in caplog.records if "SlidingWindowLayer" in r.getMessage()]
    assert len(said) == len(stages)


def test_buckets():
    assert [row_bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    assert [len_bucket(n, 16) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 128]
    s = CompileSettings(row_buckets=(1, 2, 4), min_len=64, max_len=512)
    assert s.max_graphs == 3 * 4  # 64, 128, 256, 512


def test_bucket_layer_matches_dynamic_layer_through_edits():
    """The eager path of the bucketed layer: appends, row selection and replaced tensors (a
    merge) give what a plain DynamicLayer holds, in buffers of bucket shapes."""
    from transformers.cache_utils import DynamicLayer

    bucket, plain = bucket_layer_class()((1, 2, 4), 8), DynamicLayer()
    g = torch.Generator().manual_seed(0)

    def kv(rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(rows, 2, n, 4, generator=g), torch.randn(rows, 2, n, 3, generator=g)

    def same() -> None:
        assert torch.equal(bucket.keys, plain.keys) and torch.equal(bucket.values, plain.values)
        assert bucket.get_seq_length() == plain.get_seq_length()

    for n in (5, 1, 1, 1, 1):  # a prefill, then steps: crosses the 8-token bucket
        k, v = kv(3, n)
        bucket.update(k, v)
        plain.update(k, v)
        same()
    assert bucket._kbuf.shape == (4, 2, 16, 4) and bucket._vbuf.shape == (4, 2, 16, 3)
    keep = torch.tensor([0, 2])
    bucket.batch_select_indices(keep)
    plain.batch_select_indices(keep)
    k, v = kv(2, 1)
    bucket.update(k, v)
    plain.update(k, v)
    same()
    assert bucket._kbuf.shape[0] == 2  # the smaller row bucket
    merged = torch.cat([plain.keys, plain.keys]), torch.cat([plain.values, plain.values])
    bucket.keys, bucket.values = merged
    plain.keys, plain.values = merged
    k, v = kv(4, 1)
    bucket.update(k, v)
    plain.update(k, v)
    same()
    assert bucket._kbuf.shape == (4, 2, 16, 4)


def test_stage_options_read_compile_decode_from_env():
    from pipeserve.cli.flags import stage_options_from_env

    assert stage_options_from_env({}).compile_decode is None
    assert stage_options_from_env({"PIPESERVE_COMPILE_DECODE": "0"}).compile_decode is None
    on = stage_options_from_env({"PIPESERVE_COMPILE_DECODE": "1"}).compile_decode
    assert on == CompileSettings()
    big = stage_options_from_env({"PIPESERVE_COMPILE_DECODE": "8"}).compile_decode
    assert big == CompileSettings(min_rows=8)
    with pytest.raises(ValueError, match="PIPESERVE_COMPILE_DECODE='fast'"):
        stage_options_from_env({"PIPESERVE_COMPILE_DECODE": "fast"})
