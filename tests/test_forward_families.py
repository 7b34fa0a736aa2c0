"""Pipelined forward of model shapes beyond text LMs, against the single-process model.

* ALBERT shares one layer across depths and DeBERTa-v2 calls one projection twice a layer:
  ``torch.export`` unflattens a module called N times into copies named ``mod@1`` ...
* Whisper (audio) and CLIP (text + image) have no default example inputs: planning says to
  give them; with them, the forward matches.  CLIP's image x text logits mix rows of the
  batch, so cutting it into microbatches is refused instead of silently wrong; its
  ``logit_scale`` lives on the root module, outside every unit.
"""

from __future__ import annotations

import pytest
import torch

from pipeline_core import (
    InProcessPipeline,
    InputSpec,
    LocalPipeline,
    ModelSource,
    Policy,
    make_plan,
)
from pipeline_core.errors import PlanError

from .models import VOCAB, clip_model, save_hf

pytestmark = pytest.mark.slow


def _model(cls_name: str, config):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


def _ckpt(model, tmp_path):
    return ModelSource(checkpoint=str(save_hf(model, tmp_path / "ckpt")))


@pytest.mark.parametrize("family,stages", [("albert", 2), ("deberta-v2", 3)])
def test_modules_called_more_than_once(family, stages, tmp_path):
    """Each stage loads its copies of the shared module; the stages run in one process (the
    same stage graphs and shards as stage processes: tests/test_pipeline_e2e.py)."""
    from .models import hf_model

    model = hf_model(family)
    plan = make_plan(_ckpt(model, tmp_path), Policy.equal_size(stages))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    pipe = InProcessPipeline(plan)
    for chunks in (1, 3):
        out = pipe(input_ids=ids, attention_mask=mask, chunks=chunks)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_audio_model_needs_inputs_then_matches(tmp_path):
    from transformers import WhisperConfig

    from .models import HF_CONFIGS

    bart = {k: v for k, v in HF_CONFIGS["bart"].items() if k != "model_type"}
    config = WhisperConfig(
        **dict(bart, max_position_embeddings=None),
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = _model("WhisperForConditionalGeneration", config)
    src = _ckpt(model, tmp_path)
    with pytest.raises(PlanError, match=r"inputs\.json"):
        make_plan(src, Policy.equal_size(2))
    specs = [
        InputSpec(name="input_features", shape=[2, 8, 32], dynamic={0: "batch"}),
        InputSpec(
            name="decoder_input_ids",
            shape=[2, 5],
            dtype="int64",
            dynamic={0: "batch", 1: "dec_seq"},
            high=VOCAB,
            max={1: 31},
        ),
    ]
    plan = make_plan(src, Policy.equal_size(2), inputs=specs)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 8, 32, generator=g)
    dec = torch.randint(3, VOCAB, (3, 6), generator=g)
    with torch.no_grad():
        ref = model(input_features=feats, decoder_input_ids=dec, use_cache=False).logits
    with LocalPipeline(plan) as pipe:
        out = pipe(input_features=feats, decoder_input_ids=dec, chunks=2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_rows_mixing_model_refuses_microbatches(tmp_path):
    model = clip_model()
    src = _ckpt(model, tmp_path)
    with pytest.raises(PlanError, match=r"inputs\.json"):
        make_plan(src, Policy.equal_size(2))
    text = {0: "batch", 1: "seq"}
    specs = [
        InputSpec(name="input_ids", shape=[2, 8], dtype="int64", dynamic=text, high=VOCAB),
        InputSpec(name="attention_mask", shape=[2, 8], dtype="int64", dynamic=text, high=2),
        InputSpec(name="pixel_values", shape=[2, 3, 32, 32], dynamic={0: "images"}),
    ]
    plan = make_plan(src, Policy.equal_size(3), inputs=specs)
    assert plan.rows_mixed
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(3, VOCAB, (2, 8), generator=g),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
    }
    with torch.no_grad():
        ref = model(**inputs).logits_per_image
    with LocalPipeline(plan) as pipe:
        torch.testing.assert_close(pipe(**inputs, chunks=1), ref, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="chunks=2"):
            pipe(**inputs, chunks=2)
