"""NCCL data plane: stages on separate GPUs (skipped without 2 CUDA devices)."""

from __future__ import annotations

import pytest
import torch

from pipeline_core import LocalPipeline, ModelSource, Policy, make_plan

from .models import VOCAB, hf_model, save_hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2,
        reason="needs 2 CUDA devices (NCCL cannot put two ranks on one GPU)",
    ),
]

ATOL = 1e-4  # GPU kernels for different batch sizes are not bitwise identical


@pytest.mark.parametrize("host_last_stage", [True, False])
def test_nccl_pipeline_matches_single_gpu(tmp_path, host_last_stage):
    model = hf_model("llama")
    ckpt = save_hf(model, tmp_path / "llama")
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(2))
    ids = torch.randint(0, VOCAB, (5, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model.to("cuda:0")(
            input_ids=ids.cuda(), attention_mask=mask.cuda(), use_cache=False
        ).logits.cpu()
    with LocalPipeline(plan, devices=["cuda:0", "cuda:1"], host_last_stage=host_last_stage) as pipe:
        for chunks in (1, 2, 4):
            out = pipe(input_ids=ids, attention_mask=mask, chunks=chunks).cpu()
            assert (out - ref).abs().max().item() <= ATOL
