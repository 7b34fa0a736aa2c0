"""Decode ahead (issue 23): a later stage runs its part of a lone group's next decode step up to
where the previous stage's payload comes in, before the step's message arrives, and undoes the
preparation when another message comes.  Stages run on threads of one process here (the same
``serve_generation`` loop as stage processes; the process path runs in test_generation.py)."""

from __future__ import annotations

import time

import pytest
import torch

import pipeline_core.engine as engine_module
from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.decode_ahead import decode_ahead
from pipeline_core.gen_stage import GenStage
from pipeline_core.local_generate import LocalGenerator
from pipeline_core.ring_messages import Decode
from pipeline_core.sampling import SamplingParams
from pipeline_core.stage_options import StageOptions

from .models import hf_greedy_batch, lm_model, save_hf

PROMPTS = [[5, 6, 7, 8, 9], [11, 3, 12], [2, 14, 9, 8, 21, 30, 4]]


@pytest.fixture
def slow_first_stage(monkeypatch):
    """Stage 0 sleeps 20 ms before each decode step, so that a later stage, done with its
    step, always looks for the next message before it can exist -- whether a stage runs
    ahead then does not hang on how the threads happened to be scheduled (on a loaded machine
    a thread could lose the core right after its send, and find the next message waiting)."""
    step = engine_module.run_step

    def slow(stage, msg):
        if isinstance(msg, Decode):
            time.sleep(0.02)
        return step(stage, msg)

    monkeypatch.setattr(engine_module, "run_step", slow)


def _later_stages(gen: LocalGenerator) -> list:
    assert gen.engine is not None and gen.engine.ring is not None
    return gen.engine.ring.stages


@pytest.mark.parametrize(("family", "stages"), [("llama", 4), ("gpt2", 3), ("bloom", 2)])
def test_steps_run_ahead_give_generates_tokens(tmp_path, family, stages, slow_first_stage):
    model = lm_model(family)
    plan = make_plan(
        ModelSource(checkpoint=str(save_hf(model, tmp_path / family))),
        Policy.equal_size(stages),
        trace=False,
    )
    new = 12
    with LocalGenerator(plan, in_process=True) as gen:
        got = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=new, ignore_eos=True))
        later = _later_stages(gen)
        # every later stage ran decode steps ahead of their messages: at most all but the
        # first (which learns where steps come in); fewer when a step's message was already
        # waiting when the stage looked (then there is nothing to win)
        assert all(0 < st.ahead_steps <= new - 2 for st in later), [st.ahead_steps for st in later]
    assert got == hf_greedy_batch(model, [PROMPTS[0]], new)


def test_other_messages_undo_the_preparation(tmp_path, slow_first_stage):
    """Requests arriving mid-flight (a second group, merges, rows leaving at different
    lengths) and stats requests (a control message around the ring) meet stages that
    prepared a step ahead: each is undone and handled as usual; every request's tokens stay
    those of ``generate`` alone."""
    model = lm_model("llama")
    plan = make_plan(
        ModelSource(checkpoint=str(save_hf(model, tmp_path / "llama"))),
        Policy.equal_size(3),
        trace=False,
    )
    lengths = [20, 6, 13]
    alone = [hf_greedy_batch(model, [p], n)[0] for p, n in zip(PROMPTS, lengths, strict=True)]
    with LocalGenerator(plan, in_process=True) as gen:
        handles = []
        for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
            handles.append(gen.submit(p, SamplingParams(max_new_tokens=n, ignore_eos=True)))
            if i == 0:  # the first request alone for 8 tokens: its later steps run ahead
                stream = iter(handles[0])
                for _ in range(8):
                    next(stream)
                assert sum(st.ahead_steps for st in _later_stages(gen)) > 0
            else:
                time.sleep(0.05)
            gen.stats()  # a Stats message round the ring while steps are prepared ahead
        results = [h.result(timeout=120) for h in handles]
        # which of the later messages meet a preparation depends on the threads' timing; the
        # undoing itself is checked step by step below
    assert [r.tokens for r in results] == alone


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


def test_an_undone_preparation_leaves_the_stage_as_it_was(tmp_path):
    """Stages driven step by step (no ring): a later stage prepares a step and then meets
    another message (fetch gives None), a step with other rows, or a step that comes in at
    another call -- each time the group's ids and kwargs are the very objects of before and
    the cache is as long as before; the plain steps that follow give ``generate``'s tokens,
    and a step run ahead gives the same logits as the plain step."""
    model = lm_model("llama")
    plan = make_plan(
        ModelSource(checkpoint=str(save_hf(model, tmp_path / "llama"))),
        Policy.equal_size(3),
        trace=False,
    )
    stages = [GenStage(plan, k) for k in range(3)]
    prompt = torch.tensor([PROMPTS[2]])
    payloads: list = [None]
    for st in stages:
        payloads, logits = st.prefill(0, prompt, torch.ones_like(prompt), payloads)
    tokens = [_greedy(logits)]

    def step(ahead_on: int | None = None) -> torch.Tensor:
        payloads: list = [None]
        for st in stages:
            if st.index == ahead_on:
                out = decode_ahead(st, 0, lambda sent=payloads: (tokens[-1], sent))
                assert out is not None
                payloads, logits = out
            else:
                payloads, logits = st.decode(0, None, tokens[-1], payloads)
        return logits

    tokens.append(_greedy(step()))  # the first plain step tells where steps come in
    mid = stages[1]
    call = mid.groups[0].ahead_call
    assert call is not None
    wrong_rows = torch.zeros(2, dtype=torch.long)
    wrong_call = [(call + 1, (1,), (torch.zeros(1, 1, model.config.hidden_size),))]
    for fetch in (lambda: None, lambda: (wrong_rows, [None]), lambda: (tokens[-1], wrong_call)):
        g = mid.groups[0]
        ids, kwargs, length = g.ids, g.kwargs, mid._cache_len(g)
        assert decode_ahead(mid, 0, fetch) is None
        assert g.ids is ids and g.kwargs is kwargs and mid._cache_len(g) == length
    for k in range(6):
        logits = step(ahead_on=1 if k % 2 else None)
        tokens.append(_greedy(logits))
    got = [int(t) for t in tokens]
    assert got == hf_greedy_batch(model, [PROMPTS[2]], len(got))[0]


def test_off_switch(tmp_path):
    model = lm_model("llama")
    plan = make_plan(
        ModelSource(checkpoint=str(save_hf(model, tmp_path / "llama"))),
        Policy.equal_size(3),
        trace=False,
    )
    off = StageOptions(decode_ahead=False)
    with LocalGenerator(plan, in_process=True, options=off) as gen:
        got = gen.generate([PROMPTS[2]], SamplingParams(max_new_tokens=8, ignore_eos=True))
        assert [st.ahead_steps for st in _later_stages(gen)] == [0, 0]
    assert got == hf_greedy_batch(model, [PROMPTS[2]], 8)


def test_the_last_stage_sees_the_real_tokens(tmp_path, slow_first_stage):
    """The ids are prepared with a placeholder for the new token; the last stage's logits
    rules read their values (a repetition penalty): they must be the tokens that came."""

    model = lm_model("gpt2")
    plan = make_plan(
        ModelSource(checkpoint=str(save_hf(model, tmp_path / "gpt2"))),
        Policy.equal_size(2),
        trace=False,
    )
    new = 16
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor([PROMPTS[1]]),
            do_sample=False,
            max_new_tokens=new,
            repetition_penalty=1.5,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(PROMPTS[1]) :].tolist()
    pen = SamplingParams(max_new_tokens=new, repetition_penalty=1.5, ignore_eos=True)
    with LocalGenerator(plan, in_process=True) as gen:
        assert gen.generate([PROMPTS[1]], pen) == [ref]
        assert _later_stages(gen)[0].ahead_steps > 0
