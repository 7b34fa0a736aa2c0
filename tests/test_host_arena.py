"""A stage's CPU weights live in one region advised for huge pages (issue 23;
:mod:`pipeline_core.host_arena`): values are the checkpoint's, every tensor starts on a cache
line, the region is unmapped when the stage goes, and ``huge_pages=False`` keeps the old
one-allocation-per-tensor layout with the same tokens."""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass

import pytest
import torch

from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.gen_stage import GenStage
from pipeline_core.host_arena import ALIGN, HUGE_PAGE, HostArena, arena_bytes
from pipeline_core.local_generate import LocalGenerator
from pipeline_core.sampling import SamplingParams
from pipeline_core.stage import build_stage
from pipeline_core.stage_options import StageOptions

from .models import hf_greedy_batch, lm_model, save_hf

linux = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps (Linux)")


@dataclass
class Vma:
    start: int
    end: int
    flags: set[str]


def _vmas() -> list[Vma]:
    out: list[Vma] = []
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                out.append(Vma(lo, hi, set()))
            elif line.startswith("VmFlags:"):
                out[-1].flags = set(line.split()[1:])
    return out


def _vma_of(addr: int) -> Vma:
    return next(v for v in _vmas() if v.start <= addr < v.end)


def test_place_copies_each_tensor_to_an_aligned_start():
    ts = [torch.randn(10), torch.tensor([1, 2, 3], dtype=torch.int16), torch.randn(3, 5).t()]
    arena = HostArena(arena_bytes(t.numel() * t.element_size() for t in ts))
    placed = [arena.place(t) for t in ts]
    for t, p in zip(ts, placed, strict=True):
        assert torch.equal(p, t) and p.dtype == t.dtype and p.is_contiguous()
        assert p.data_ptr() % ALIGN == 0
    assert len({p.untyped_storage().data_ptr() for p in placed}) == 1
    ts[0].add_(1)
    assert not torch.equal(placed[0], ts[0])  # a copy, not a view of the source
    assert arena.free == 0
    assert arena.place(placed[1]) is placed[1]  # already there
    extra = torch.ones(4)
    assert arena.take(4) is None
    assert arena.place(extra) is extra  # full: left where it is
    meta = torch.empty(4, device="meta")
    assert HostArena(64).place(meta) is meta  # not on the CPU: left where it is


def test_take_is_read_into_and_place_casts():
    half = torch.randn(7, dtype=torch.bfloat16)
    arena = HostArena(arena_bytes([14, 28]))
    slot = arena.take(14)
    assert slot is not None and slot.dtype == torch.uint8 and slot.numel() == 14
    slot.copy_(half.view(torch.uint8))  # as a reader fills it
    kept = slot.view(torch.bfloat16)
    assert arena.holds(kept) and torch.equal(kept, half)
    assert arena.place(kept) is kept
    wide = arena.place(kept, torch.float32)  # the plan's dtype: cast into its own place
    assert wide.dtype == torch.float32 and torch.equal(wide, half.float()) and arena.holds(wide)
    assert arena.free == 0 and not arena.holds(half)


@linux
def test_region_is_advised_for_huge_pages_and_unmapped_when_dropped():
    arena = HostArena(3 * HUGE_PAGE)
    t = arena.place(torch.ones(3 * HUGE_PAGE // 4))
    arena.release()
    assert t.data_ptr() % HUGE_PAGE == 0  # whole huge pages, from the first byte
    vma = _vma_of(t.data_ptr())
    if arena.advised:
        assert "hg" in vma.flags, vma
    assert torch.equal(t, torch.ones_like(t))
    del t, arena
    gc.collect()
    assert all((v.start, v.end) != (vma.start, vma.end) for v in _vmas())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = lm_model("llama")
    ckpt = save_hf(model, tmp_path_factory.mktemp("arena") / "llama")
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(2), trace=False)
    return model, plan


def _storages(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters() if not p.is_meta}


@pytest.mark.parametrize("index", [0, 1])
def test_a_generation_stage_keeps_its_weights_in_one_region(llama, index):
    model, plan = llama
    stage = GenStage(plan, index)
    ref = model.state_dict()
    owned = {n: p for n, p in stage.model.named_parameters() if not p.is_meta}
    assert owned
    for n, p in owned.items():
        assert torch.equal(p, ref[n]), n
        assert p.data_ptr() % ALIGN == 0
    assert len(_storages(stage.model)) == 1
    if sys.platform == "linux":
        assert "hg" in _vma_of(next(iter(owned.values())).data_ptr()).flags
    plain = GenStage(plan, index, huge_pages=False)
    assert len(_storages(plain.model)) == len({id(p) for p in owned.values()})


def test_a_forward_stage_keeps_its_weights_in_one_region(llama):
    _, plan = llama
    stage = build_stage(make_plan(plan.source, Policy.equal_size(2)), 1)
    assert len(_storages(stage.module)) == 1


@pytest.mark.parametrize("huge", [True, False])
def test_tokens_are_generates_either_way(llama, huge):
    model, plan = llama
    prompts = [[5, 6, 7, 8, 9], [11, 3, 12]]
    opts = StageOptions(huge_pages=huge)
    with LocalGenerator(plan, in_process=True, options=opts) as gen:
        got = gen.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert got == hf_greedy_batch(model, prompts, 8)


def test_env_turns_huge_pages_off():
    from pipeserve.cli.flags import stage_options_from_env

    assert stage_options_from_env({}).huge_pages is True
    assert stage_options_from_env({"PIPESERVE_HUGE_PAGES": "0"}).huge_pages is False
