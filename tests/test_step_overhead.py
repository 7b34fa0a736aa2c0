"""Per-step work a generation stage must not repeat (issue 23): a unit the stage skips is run
on the meta device once per shape of its arguments, not once per step; tokens stay equal to
``generate``'s."""

from __future__ import annotations

import pytest
import torch

from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.gen_stage import GenStage
from pipeline_core.local_generate import LocalGenerator
from pipeline_core.sampling import SamplingParams
from pipeline_core.stage_hooks import meta_key

from .models import hf_greedy_batch, lm_model, save_hf

PROMPT = [5, 6, 7, 8, 9]
NEW = 6


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_skipped_units_run_on_meta_once_per_shape(tmp_path, monkeypatch, family):
    model = lm_model(family)
    ckpt = save_hf(model, tmp_path / family)
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(3), trace=False)
    runs: list[tuple[int, str]] = []
    on_meta = GenStage._on_meta

    def counted(self, mod, what, *args, **kwargs):
        runs.append((self.index, type(mod).__name__))
        return on_meta(self, mod, what, *args, **kwargs)

    monkeypatch.setattr(GenStage, "_on_meta", counted)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    want = hf_greedy_batch(model, [PROMPT], NEW)
    with LocalGenerator(plan, in_process=True) as gen:
        assert gen.generate([PROMPT], params) == want
        assert runs  # later stages skip the embeddings
        first = len(runs)
        assert gen.generate([PROMPT], params) == want  # the same shapes again
    assert len(runs) == first, runs[first:]


def test_meta_keys_of_other_objects_never_outlive_their_object():
    """Two objects alive one after the other can share an ``id``; a key holding the first
    keeps it alive, so the second never hits the first's cached meta output."""

    class Opaque:
        pass

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

    keys = [meta_key(Opaque()) for _ in range(8)]  # each object freed once its key is made
    assert len(set(keys)) == 8
    shared = Opaque()
    assert meta_key(shared) == meta_key(shared)  # the same object: a hit
    assert meta_key(Unhashable()) != meta_key(Unhashable())
    assert meta_key((torch.zeros(2, 3), 4)) == meta_key((torch.ones(2, 3), 4))


class _Unit(torch.nn.Module):
    def forward(self, hidden, mask=None, *rest, bias=None, scale=1.0, **extra):
        return hidden


class _NoVarargs(torch.nn.Module):
    def forward(self, hidden, mask=None, bias=None):
        return hidden


@pytest.mark.parametrize("unit", [_Unit(), _NoVarargs()])
def test_capture_and_inject_bind_as_the_signature_does(unit):
    """capture / inject work out a call's parameter positions without ``Signature.bind`` (on
    the token's path); they must find what binding finds, for positional, keyword, ``*args``
    and ``**kwargs`` arguments alike."""
    import inspect

    from pipeline_core.stage_hooks import capture, inject

    sig = inspect.signature(type(unit).forward)
    names = list(sig.parameters)
    h, m, b, other = (torch.full((1, 2), float(i)) for i in range(4))
    produced = {id(t): t for t in (m, b)}  # earlier units made them; ``other`` they did not
    calls = [((h, m), {"bias": b}), ((h,), {"mask": m, "bias": other}), ((), {"hidden": h})]
    if isinstance(unit, _Unit):
        calls += [((h, m, b, other), {"bias": b, "x": m, "scale": 2.0})]
    for args, kwargs in calls:
        bound = sig.bind(unit, *args, **kwargs).arguments
        want = tuple(
            (names.index(k), v)
            for k, v in bound.items()
            if isinstance(v, torch.Tensor) and (names.index(k) == 1 or id(v) in produced)
        )
        got = capture(unit, args, kwargs, produced)
        assert [(p, id(t)) for p, t in got] == [(p, id(t)) for p, t in want]
        new = tuple((p, t + 10) for p, t in got)
        a2, k2 = inject(unit, args, kwargs, new)
        after = sig.bind(unit, *a2, **k2).arguments
        for p, t in new:
            assert after[names[p]] is t
        untouched = set(bound) - {names[p] for p, _ in new}
        for k in untouched:
            if isinstance(bound[k], torch.Tensor):
                assert after[k] is bound[k]
            elif isinstance(bound[k], tuple | dict):  # what *args / **kwargs took
                assert len(after[k]) == len(bound[k])


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_a_stage_stops_right_after_its_last_unit_once_learnt(tmp_path, monkeypatch, family):
    """Where only the last owned unit's output goes on, a stage learns it at its first stop and
    then stops right after that unit (not entering the next one: no capture); T5's decoder
    layers also pass on a position bias, so its stages keep stopping at the next call.
    Tokens stay ``generate``'s."""
    import pipeline_core.gen_stage as gen_stage

    model = lm_model(family)
    ckpt = save_hf(model, tmp_path / family)
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(3), trace=False)
    captured: list[str] = []
    capture = gen_stage.capture

    def counted(mod, *args, **kwargs):
        captured.append(type(mod).__name__)
        return capture(mod, *args, **kwargs)

    monkeypatch.setattr(gen_stage, "capture", counted)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    want = hf_greedy_batch(model, [PROMPT], NEW)
    with LocalGenerator(plan, in_process=True) as gen:
        assert gen.generate([PROMPT], params) == want
        assert captured  # the first stops
        captured.clear()
        assert gen.generate([PROMPT], params) == want
    if family == "t5":
        assert captured
    else:
        assert captured == []


def test_greedy_choice_is_torch_argmax():
    """The last stage's greedy choice (numpy's argmax on the CPU, faster than torch's) picks
    what ``torch.argmax`` picks: the first maximal index, ties and NaN included."""
    from pipeline_core.sampling import _argmax

    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(1, 32000, generator=g), torch.randn(4, 257, generator=g)]
    tied = torch.zeros(3, 9)
    tied[0, 2] = tied[0, 6] = 1.0
    tied[2, 8] = 1.0
    nan = torch.randn(2, 9, generator=g)
    nan[1, 3] = nan[1, 5] = float("nan")
    view = torch.randn(2, 3, 40, generator=g)[:, -1, :]  # the logits' last position: strided
    for x in [*rows, tied, nan, view, tied.double()]:
        got = _argmax(x)
        assert got.dtype == torch.long and torch.equal(got, torch.argmax(x, dim=-1))
