"""Stage 0 makes a lone group's next decode step's model inputs while the step is in flight
(issue 23; :func:`pipeline_core.decode_ahead.prepare_decode`): the token it waits for is
written in when it comes.  Tokens stay ``generate``'s; rows leaving drop the preparation."""

from __future__ import annotations

import pytest
import torch

from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.gen_group import GroupState
from pipeline_core.local_generate import LocalGenerator
from pipeline_core.sampling import SamplingParams
from pipeline_core.stage_options import StageOptions

from .models import hf_greedy_batch, lm_model, save_hf

PROMPTS = [[5, 6, 7, 8, 9], [11, 3, 12], [2, 14, 9, 8, 21, 30, 4]]


@pytest.fixture
def used(monkeypatch) -> list[int]:
    """Rows of each decode step that ran from prepared inputs."""
    got: list[int] = []
    take = GroupState.take_prepared

    def counted(self, keep, tokens):
        inputs = take(self, keep, tokens)
        if inputs is not None:
            got.append(self.rows)
        return inputs

    monkeypatch.setattr(GroupState, "take_prepared", counted)
    return got


def _plan(tmp_path, family: str, stages: int):
    model = lm_model(family)
    ckpt = save_hf(model, tmp_path / family)
    return model, make_plan(
        ModelSource(checkpoint=str(ckpt)), Policy.equal_size(stages), trace=False
    )


@pytest.mark.parametrize(("family", "stages"), [("llama", 3), ("gpt2", 2)])
def test_prepared_steps_give_generates_tokens(tmp_path, used, family, stages):
    model, plan = _plan(tmp_path, family, stages)
    new = 12
    with LocalGenerator(plan, in_process=True) as gen:
        got = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=new, ignore_eos=True))
    assert got == hf_greedy_batch(model, [PROMPTS[0]], new)
    # the prefill's step and new - 2 decode steps were in flight alone: each let stage 0
    # prepare the next one (unless the tokens were already back when it looked)
    assert 0 < len(used) <= new - 1, used


def test_rows_leaving_drop_the_preparation(tmp_path, used):
    """Two groups of two rows; once the short one is done the other is alone (prepared
    steps) until its first row leaves: that step selects rows and runs unprepared, then the
    remaining row's steps are prepared again."""
    model, plan = _plan(tmp_path, "llama", 2)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0][::-1]]
    lengths = [6, 14, 2, 2]  # admitted together: groups of rows (0, 1) and (2, 3)
    alone = [hf_greedy_batch(model, [p], n)[0] for p, n in zip(prompts, lengths, strict=True)]
    with LocalGenerator(plan, in_process=True) as gen:
        handles = [
            gen.submit(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
            for p, n in zip(prompts, lengths, strict=True)
        ]
        got = [h.result(timeout=120).tokens for h in handles]
    assert got == alone
    assert 2 in used and 1 in used, used


def test_a_preparation_is_used_once_and_only_for_its_ids():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])

    def prepared(g: GroupState) -> tuple:
        grown = torch.cat([g.ids, g.ids.new_zeros(2, 1)], dim=-1)
        return (g.ids, grown, {"k": 1}, {"input_ids": grown[:, -1:].clone()})

    g = GroupState(ids, {})
    g.prepared = prepared(g)
    inputs = g.take_prepared(None, torch.tensor([7, 8]))
    assert inputs["input_ids"].tolist() == [[7], [8]]
    assert g.ids.tolist() == [[1, 2, 3, 7], [4, 5, 6, 8]] and g.kwargs == {"k": 1}
    assert g.prepared is None and g.take_prepared(None, torch.tensor([9, 9])) is None
    g.prepared = prepared(g)
    assert g.take_prepared(torch.tensor([1]), torch.tensor([9])) is None  # rows leave
    assert g.prepared is None and g.ids.shape == (2, 4)
    g.prepared = prepared(g)
    g.ids = g.ids[:1]  # rows changed since (a select, a merge): the ids are not those
    assert g.take_prepared(None, torch.tensor([9])) is None and g.ids.shape == (1, 4)


def test_decode_ahead_off_prepares_nothing(tmp_path, used):
    model, plan = _plan(tmp_path, "llama", 2)
    off = StageOptions(decode_ahead=False)
    with LocalGenerator(plan, in_process=True, options=off) as gen:
        got = gen.generate([PROMPTS[2]], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert got == hf_greedy_batch(model, [PROMPTS[2]], 8)
    assert used == []
