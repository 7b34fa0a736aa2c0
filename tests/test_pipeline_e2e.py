"""Pipelined forward equals the single-process model, for every family and split.

Every family's 3-stage split (the first families' 2-stage split too) runs in one process
(:class:`InProcessPipeline`: the same stage graphs, checkpoint shards, microbatching and wiring
as the stage processes, each value that crosses a stage encoded by the transport's codec) with
chunks 1, 2 and 4 and a batch size
that does not divide evenly: a stage process adds start-up, not arithmetic, so one family per
mechanism runs in separate processes (gloo): every stage in its own process (Llama), the
driver hosting the last stage (T5, whose decoder reads the encoder's output across stages);
the other tests here run 2 and 3 stages in processes too.  Outputs must be bitwise equal to
the single-process model run on the same (micro)batch rows; we compare against the full-batch
reference with ``torch.equal`` first and, where CPU kernels pick a different blocking for a
smaller batch, accept at most 1e-5 absolute difference (stated tolerance).
"""

from __future__ import annotations

import pytest
import torch

from pipeline_core import InProcessPipeline, LocalPipeline, ModelSource, Policy, make_plan

from .models import VOCAB, hf_model, save_hf

pytestmark = pytest.mark.slow

FAMILIES = ["gpt2", "opt", "bloom", "gpt_neo", "codegen", "llama", "t5", "resnet"]
ATOL = 1e-5


EXTRA_FAMILIES = ["mistral", "qwen2", "falcon", "gptj", "bart", "marian", "mixtral", "bert", "vit"]
IMAGE = {"resnet", "vit"}
NO_CACHE_ARG = IMAGE | {"bert"}


def _inputs(family: str, batch: int, seq: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if family in IMAGE:
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, : seq // 3] = 0  # a left-padded row
    out = {"input_ids": ids, "attention_mask": mask}
    if family in ("t5", "bart", "marian"):
        out["decoder_input_ids"] = torch.randint(0, VOCAB, (batch, seq - 2), generator=gen)
    return out


def _reference(model: torch.nn.Module, family: str, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        if family in NO_CACHE_ARG:
            return model(**inputs).logits
        return model(**inputs, use_cache=False).logits


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if not torch.equal(out, ref):
        diff = (out - ref).abs().max().item()
        assert diff <= ATOL, f"max abs diff {diff}"


CASES = [(4, 9, 1), (5, 7, 2), (5, 12, 4), (1, 5, 2)]


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_family_splits_match_single_process(family, tmp_path):
    """FAMILIES at 2 and 3 stages, EXTRA_FAMILIES (nobody wrote code for them) at 3."""
    model = hf_model(family)
    src = ModelSource(checkpoint=str(save_hf(model, tmp_path / family)))
    for stages in (2, 3) if family in FAMILIES else (3,):
        plan = make_plan(src, Policy.equal_size(stages))
        assert plan.num_stages == stages
        pipe = InProcessPipeline(plan)
        gen = torch.Generator().manual_seed(stages)
        for batch, seq, chunks in CASES:
            inputs = _inputs(family, batch, seq, gen)
            _check(pipe(**inputs, chunks=chunks), _reference(model, family, inputs))


@pytest.mark.parametrize("family,host_last", [("llama", False), ("t5", True)])
def test_family_pipeline_in_processes(family, host_last, tmp_path):
    """3 stages in separate processes: every stage in its own (Llama), or the driver
    hosting the last one (T5)."""
    model = hf_model(family)
    ckpt = save_hf(model, tmp_path / family)
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(3))
    gen = torch.Generator().manual_seed(3)
    with LocalPipeline(plan, host_last_stage=host_last) as pipe:
        for batch, seq, chunks in CASES:
            inputs = _inputs(family, batch, seq, gen)
            _check(pipe(**inputs, chunks=chunks), _reference(model, family, inputs))


def test_bin_index_checkpoint(tmp_path):
    """A pytorch_model.bin.index.json checkpoint (loaded with weights_only=True, mmap)."""
    model = hf_model("opt")
    ckpt = save_hf(model, tmp_path / "opt-bin", bin_index=True)
    assert (ckpt / "pytorch_model.bin.index.json").is_file()
    assert not list(ckpt.glob("*.safetensors"))
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(2))
    gen = torch.Generator().manual_seed(0)
    with LocalPipeline(plan) as pipe:
        inputs = _inputs("opt", 3, 8, gen)
        _check(pipe(**inputs, chunks=2), _reference(model, "opt", inputs))


def test_bfloat16_tied_weights_and_tiny_shapes(tmp_path):
    """bf16 stages (tied lm_head), batch 1, sequence length 1 and 100; bf16 tolerance 1e-2."""
    model = hf_model("llama")
    ckpt = save_hf(model, tmp_path / "llama")
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(2), dtype="bf16")
    model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    with LocalPipeline(plan) as pipe:
        for batch, seq in [(1, 1), (2, 1), (3, 100)]:
            ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
            mask = torch.ones_like(ids)
            out = pipe(input_ids=ids, attention_mask=mask, chunks=2)
            ref = _reference(model, "llama", {"input_ids": ids, "attention_mask": mask})
            assert out.dtype == torch.bfloat16 and out.shape == ref.shape
            assert (out.float() - ref.float()).abs().max().item() <= 1e-2


def test_bad_requests_fail_alone(tmp_path):
    """Bad inputs get clear errors; a stage that raises fails only that request, and the
    pipeline keeps serving (no hang, no dead stage)."""
    model = hf_model("gpt2")
    plan = make_plan(
        ModelSource(checkpoint=str(save_hf(model, tmp_path / "gpt2"))), Policy.equal_size(3)
    )
    good = _inputs("gpt2", 2, 6, torch.Generator().manual_seed(0))
    with LocalPipeline(plan, host_last_stage=False) as pipe:
        with pytest.raises(ValueError, match="must have 2 dimensions"):
            pipe(input_ids=good["input_ids"][0], attention_mask=good["attention_mask"][0])
        with pytest.raises(ValueError, match="at most 127"):
            long = torch.zeros(1, 300, dtype=torch.long)
            pipe(input_ids=long, attention_mask=torch.ones_like(long))
        with pytest.raises(TypeError, match="missing inputs"):
            pipe(input_ids=good["input_ids"])
        bad = dict(good, input_ids=good["input_ids"] + 10_000)  # token ids past the vocab
        with pytest.raises(RuntimeError, match="stage 0 failed"):
            pipe(**bad, chunks=2)
        _check(pipe(**good, chunks=2), _reference(model, "gpt2", good))
