"""CUDA stages: NCCL between GPUs; gloo through host memory where NCCL cannot go (two stages
sharing one GPU, or a CPU stage beside a GPU stage).  Skipped without the GPUs each case needs."""

from __future__ import annotations

import pytest
import torch

from pipeline_core import LocalPipeline, ModelSource, Policy, SamplingParams, make_plan
from pipeline_core.local_generate import LocalGenerator

from .models import VOCAB, hf_greedy_batch, hf_model, lm_model, save_hf

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ATOL = 1e-4  # GPU kernels for different batch sizes are not bitwise identical
GPUS = torch.cuda.device_count()


CASES = {
    "two-gpus": ["cuda:0", "cuda:1"],
    "shared-gpu": ["cuda:0", "cuda:0"],
    "cpu-and-gpu": ["cpu", "cuda:0"],
}


def _devices(kind: str) -> list[str]:
    """The stage devices of a case, or skip when this machine lacks them."""
    devices = CASES[kind]
    need = len({d for d in devices if d.startswith("cuda")})
    if need > GPUS:
        why = "NCCL cannot put two ranks on one GPU" if need == 2 else "no CUDA device"
        pytest.skip(f"needs {need} CUDA device(s) ({why}); this machine has {GPUS}")
    return devices


@pytest.mark.parametrize("host_last_stage", [True, False])
@pytest.mark.parametrize("kind", list(CASES))
def test_cuda_pipeline_matches_single_gpu(tmp_path, kind, host_last_stage):
    devices = _devices(kind)
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
    with LocalPipeline(plan, devices=devices, host_last_stage=host_last_stage) as pipe:
        for chunks in (1, 2, 4):
            out = pipe(input_ids=ids, attention_mask=mask, chunks=chunks).cpu()
            assert (out - ref).abs().max().item() <= ATOL


PROMPTS = [[5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
NEW = 32


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("kind", list(CASES))
def test_cuda_generation_matches_hf_generate(tmp_path, kind, family):
    """KV caches on the GPU, the token ring over NCCL or host memory: greedy tokens equal
    ``generate`` on one GPU (fp32; TF32 stays off, torch's default for matmuls)."""
    devices = _devices(kind)
    model = lm_model(family)
    ckpt = save_hf(model, tmp_path / family)
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(2), trace=False)
    with LocalGenerator(plan, devices=devices) as gen:
        got = gen.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
        sample = SamplingParams(max_new_tokens=NEW, temperature=0.9, top_p=0.9, seed=3)
        first = gen.generate(PROMPTS, sample)
        assert gen.generate(PROMPTS, sample) == first  # seeded sampling reproducible on GPU
        assert all(s["sequences"] == 0 for s in gen.stats())
    assert got == hf_greedy_batch(model, PROMPTS, NEW, "cuda:0")
