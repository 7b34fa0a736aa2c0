"""Pipelined KV-cached generation (separate processes, gloo ring) equals ``transformers``.

Greedy tokens must be *identical* to ``model.generate(do_sample=False)`` in one process, for a
batch of prompts of different lengths (left-padded, as ``generate`` takes them), 32 new tokens,
on 2 and 3 stages of every supported family: a decoder-only and an encoder-decoder family over
the ring between stage processes, the others with the stages in this process
(``in_process``: the same stage code and messages, without the start-up of a process per
stage; tests/test_generation_splits.py cuts every family everywhere that way too).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.engine import EngineLimits, GenerationEngine, group_size
from pipeline_core.gen_stage import GenStage, UnsupportedModelError
from pipeline_core.local_generate import LocalGenerator
from pipeline_core.sampling import RequestError, ResourceExhausted, SamplingParams

from .models import VOCAB, hf_greedy_batch, hf_model, lm_model, save_hf

pytestmark = pytest.mark.slow

FAMILIES = ["gpt2", "opt", "bloom", "gpt_neo", "codegen", "llama", "t5"]
PROMPTS = [
    [5, 6, 7, 8, 9],
    [3, 4, 5, 6, 7, 8, 9, 10, 11],
    [20, 21, 22],
    [40, 41, 42, 43, 44, 45, 46],
]
NEW = 32


def _plan(tmp_path, family: str, stages: int, model=None):
    model = model if model is not None else lm_model(family)
    ckpt = save_hf(model, tmp_path / family)
    return model, make_plan(
        ModelSource(checkpoint=str(ckpt)), Policy.equal_size(stages), trace=False
    )


GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
IN_PROCESSES = {("llama", 3), ("t5", 2)}  # (family, stages) run in stage processes


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_matches_hf_generate(family, stages, tmp_path):
    model, plan = _plan(tmp_path, family, stages)
    ref = hf_greedy_batch(model, PROMPTS, NEW)
    with LocalGenerator(plan, in_process=(family, stages) not in IN_PROCESSES) as gen:
        assert gen.generate(PROMPTS, GREEDY) == ref
        # every stage loaded only its own shard
        read = [info["bytes_read"] for info in gen.stage_info]
        assert sum(read) == pytest.approx(plan.total_bytes, rel=0.3) and all(read)
        sample = SamplingParams(
            max_new_tokens=NEW, temperature=0.9, top_k=30, top_p=0.9, seed=11, ignore_eos=True
        )
        first = gen.generate(PROMPTS, sample)
        assert gen.generate(PROMPTS, sample) == first  # reproducible with a seed
        other = SamplingParams(**{**vars(sample), "seed": 12})
        assert gen.generate(PROMPTS, other) != first
        big = SamplingParams(**{**vars(sample), "seed": 2**64 - 1})  # any uint64 seed
        assert gen.generate(PROMPTS, big) == gen.generate(PROMPTS, big) != first
        assert all(s["sequences"] == 0 and s["bytes"] == 0 for s in gen.stats())


def test_one_stage_and_repetition_penalty(tmp_path):
    model, plan = _plan(tmp_path, "gpt2", 1)
    with LocalGenerator(plan) as gen:
        assert gen.generate(PROMPTS, GREEDY) == hf_greedy_batch(model, PROMPTS, NEW)
        pen = SamplingParams(max_new_tokens=16, repetition_penalty=1.5, ignore_eos=True)
        with torch.no_grad():
            ref = model.generate(
                input_ids=torch.tensor([PROMPTS[1]]),
                do_sample=False,
                max_new_tokens=16,
                repetition_penalty=1.5,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(PROMPTS[1]) :].tolist()
        assert gen.generate([PROMPTS[1]], pen) == [ref]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    model = lm_model("llama")
    ckpt = save_hf(model, tmp_path_factory.mktemp("gen") / "llama")
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(3), trace=False)
    with LocalGenerator(plan, limits=EngineLimits(max_tokens=2000)) as gen:
        yield model, gen


def test_staggered_requests_match_running_alone(llama3):
    _, gen = llama3
    prompts = [[*PROMPTS[i % 4][: 3 + i % 5], i + 1] for i in range(8)]
    lengths = [12, 40, 7, 25, 33, 18, 9, 28]
    alone = [
        gen.generate([p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
        for p, n in zip(prompts, lengths, strict=True)
    ]
    stop = alone[3][10]  # request 3 stops early at its first `stop` token (a stop id)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    params[3] = SamplingParams(max_new_tokens=lengths[3], stop_token_ids=(stop,), ignore_eos=True)
    groups_before = gen.engine.counters.groups_max
    handles = []
    for p, sp in zip(prompts, params, strict=True):
        handles.append(gen.submit(p, sp))
        time.sleep(0.03)  # arrive while earlier requests are mid-flight
    results = [h.result(timeout=120) for h in handles]
    for i, r in enumerate(results):
        if i == 3:
            cut = alone[3].index(stop) + 1
            assert r.tokens == alone[3][:cut] and r.finish_reason == "stop"
        else:
            assert r.tokens == alone[i] and r.finish_reason == "length", i
    assert gen.engine.counters.groups_max >= max(3, groups_before)  # groups overlapped


def test_a_burst_is_spread_over_the_stages():
    """Group sizes at admission (the sizing rule; the test above checks the tokens)."""
    assert group_size(64, 0, 0, 2, 64) == 32  # nothing running: one group per stage
    assert group_size(64, 0, 0, 1, 64) == 64
    assert group_size(100, 0, 0, 2, 32) == 32  # the row cap
    # one request already running (group A) when 63 arrive: the next group takes an even share,
    # not all 63; the 31 left start a group that merges into A (1 + 31 rows)
    assert group_size(63, 1, 1, 2, 64) == 32
    assert group_size(31, 33, 2, 2, 64) == 31
    assert group_size(1, 0, 0, 3, 32) == 1


def _wait_stats(gen, ok, timeout: float = 30.0) -> list[dict[str, int]]:
    deadline = time.monotonic() + timeout
    while True:
        stats = gen.stats()
        if all(ok(s) for s in stats):
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.01)


def test_cancel_frees_cache_on_every_stage(llama3):
    _, gen = llama3
    keep = gen.submit(PROMPTS[0], SamplingParams(max_new_tokens=300, ignore_eos=True))
    victim = gen.submit(PROMPTS[1], SamplingParams(max_new_tokens=300, ignore_eos=True))
    for _ in victim:
        if len(victim.tokens) >= 5:
            break
    before = gen.stats()
    assert all(s["sequences"] == 2 and s["bytes"] > 0 for s in before)
    victim.cancel()
    assert victim.result(timeout=60).finish_reason == "cancelled"
    after = _wait_stats(gen, lambda s: s["sequences"] == 1)
    assert all(a["bytes"] < b["bytes"] for a, b in zip(after, before, strict=True))
    keep.cancel()
    keep.result(timeout=60)
    after = _wait_stats(gen, lambda s: s["sequences"] == 0)
    assert all(s["bytes"] == 0 and s["groups"] == 0 for s in after)


def test_bad_requests_fail_alone(llama3):
    _, gen = llama3
    expected = gen.generate([PROMPTS[2]], SamplingParams(max_new_tokens=24, ignore_eos=True))[0]
    good = gen.submit(PROMPTS[2], SamplingParams(max_new_tokens=24, ignore_eos=True))
    ctx = gen.engine.context
    bad = [
        ([], {}, "prompt is empty"),
        ([1, VOCAB + 3], {}, "outside the vocabulary"),
        ([1, -1], {}, "outside the vocabulary"),
        ([1, 2], {"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ([1, 2], {"max_new_tokens": ctx}, "exceeds the model's context"),
        ([1, 2], {"temperature": -0.5}, "temperature must be >= 0"),
        ([1, 2], {"top_p": 0.0}, "top_p must be in (0, 1]"),
        ([1, 2], {"top_p": 1.5}, "top_p must be in (0, 1]"),
    ]
    for prompt, kw, msg in bad:
        with pytest.raises(RequestError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            gen.submit(prompt, SamplingParams(**kw))
    r = good.result(timeout=60)
    assert r.tokens == expected


def test_kv_budget_queues_then_refuses(llama3):
    _, gen = llama3
    with pytest.raises(ResourceExhausted, match="KV budget is 2000"):
        gen.submit([1] * 10, SamplingParams(max_new_tokens=2010))
    # three requests that fit only one at a time: they wait their turn, all complete
    params = SamplingParams(max_new_tokens=900, ignore_eos=True)
    hs = [gen.submit(PROMPTS[i], params) for i in range(3)]
    time.sleep(0.3)
    assert gen.stats()[0]["sequences"] <= 2
    for h in hs:
        h.cancel()
    assert {h.result(timeout=60).finish_reason for h in hs} == {"cancelled"}


def test_timeout(llama3):
    _, gen = llama3
    r = gen.submit(PROMPTS[0], SamplingParams(max_new_tokens=1000, ignore_eos=True, timeout_s=0.2))
    res = r.result(timeout=60)
    assert res.finish_reason == "timeout" and 0 < len(res.tokens) < 1000


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    ckpt = save_hf(hf_model("bert"), tmp_path / "bert")
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(2), trace=False)
    with pytest.raises(UnsupportedModelError, match=r"cannot generate.*supported families: gpt2"):
        GenStage(plan, 0)


def test_streaming_one_stage_engine_in_process(tmp_path):
    model, plan = _plan(tmp_path, "opt", 1)
    engine = GenerationEngine(GenStage(plan, 0), None)
    try:
        h = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=NEW, ignore_eos=True))
        seen: list[int] = []
        t = threading.Thread(target=lambda: seen.extend(h))
        t.start()
        t.join(60)
        assert seen == hf_greedy_batch(model, [PROMPTS[0]], NEW)[0]
    finally:
        engine.close()


def _ring_free_step(stages, op: str, gid: int, *args):
    """Run one step through in-process stages (no transport): returns the last stage's logits."""
    payloads: list = [None] * (2 if stages[0].enc_dec and op == "prefill" else 1)
    for st in stages:
        fn = st.prefill if op == "prefill" else st.decode
        payloads, logits = fn(gid, *args, payloads)
    return logits


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom", "codegen", "llama"])
def test_groups_merge_mid_generation(family, tmp_path):
    """A group that prefilled later joins a running one (left-padded caches on every stage);
    every row still gets exactly the tokens it gets alone."""
    model, plan = _plan(tmp_path, family, 3)
    stages = [GenStage(plan, k) for k in range(3)]
    assert all(st.can_merge for st in stages)
    a_prompts, b_prompts = [PROMPTS[0], PROMPTS[2]], [PROMPTS[1]]
    alone = {tuple(p): hf_greedy_batch(model, [p], 20)[0] for p in a_prompts + b_prompts}

    def pad(ps):
        w = max(map(len, ps))
        ids = torch.zeros(len(ps), w, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(ps):
            ids[r, w - len(p) :], mask[r, w - len(p) :] = torch.tensor(p), 1
        return ids, mask

    out = {0: [], 1: []}
    tok = {0: _ring_free_step(stages, "prefill", 0, *pad(a_prompts)).argmax(-1)}
    out[0].append(tok[0])
    for _ in range(6):  # group 0 decodes alone for a while
        tok[0] = _ring_free_step(stages, "decode", 0, None, tok[0]).argmax(-1)
        out[0].append(tok[0])
    tok[1] = _ring_free_step(stages, "prefill", 1, *pad(b_prompts)).argmax(-1)
    out[1].append(tok[1])
    for st in stages:
        st.merge(0, 1)
    merged = torch.cat([tok[0], tok[1]])
    history = [torch.stack(out[0], 1), torch.stack(out[1], 1)]
    rows: list[list[int]] = [r.tolist() for r in history[0]] + [r.tolist() for r in history[1]]
    while min(len(r) for r in rows) < 20:
        merged = _ring_free_step(stages, "decode", 0, None, merged).argmax(-1)
        for r, t in zip(rows, merged.tolist(), strict=True):
            r.append(t)
    for p, r in zip(a_prompts + b_prompts, rows, strict=True):
        assert r[:20] == alone[tuple(p)], p
    assert all(st.cache_stats()["sequences"] == 3 for st in stages)


def test_queue_full_is_refused(tmp_path):
    _, plan = _plan(tmp_path, "gpt2", 1)
    engine = GenerationEngine(GenStage(plan, 0), None, EngineLimits(max_sequences=1, max_queue=1))
    try:
        running = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=100, ignore_eos=True))
        next(iter(running))  # admitted: it holds the only sequence slot
        waiting = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=4, ignore_eos=True))
        with pytest.raises(ResourceExhausted, match="queue is full"):
            engine.submit(PROMPTS[2], SamplingParams(max_new_tokens=4))
        running.cancel()
        assert waiting.result(timeout=60).finish_reason == "length"  # it got its turn
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["gpt2", "t5", "bart"])
def test_a_replay_continues_exactly(family, tmp_path):
    """A replay after a lost worker (``resume``: the tokens already streamed) continues the
    same tokens: seeded draws depend only on (seed, k), a decoder-only model reads the replayed
    tokens as prompt, an encoder-decoder's decoder starts from them (its encoder input stays
    the prompt), and the model's rules (BART's forced EOS) count them."""
    model = lm_model(family)
    ckpt = save_hf(model, tmp_path / "ckpt")
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(2), trace=False)
    with LocalGenerator(plan) as gen:
        for kw in (dict(), dict(temperature=1.0, top_k=40, seed=1234)):
            params = SamplingParams(max_new_tokens=24, ignore_eos=True, **kw)
            full = gen.generate([PROMPTS[1]], params)[0]
            k = 9
            r = gen.submit(PROMPTS[1], params, resume=full[:k]).result(timeout=60)
            assert full[k:] == r.tokens, kw
            assert r.prompt_tokens == len(PROMPTS[1]) + k  # the replayed tokens count as input
        # replays of different prompts (and of different lengths so far) at once
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        full = gen.generate(PROMPTS[:3], params)
        cut = [5, 5, 8]
        handles = [
            gen.submit(p, params, resume=f[:c]) for p, f, c in zip(PROMPTS, full, cut, strict=False)
        ]
        assert [h.result(timeout=60).tokens for h in handles] == [
            f[c:] for f, c in zip(full, cut, strict=True)
        ]
        with pytest.raises(RequestError, match="already reach max_new_tokens"):
            gen.submit(PROMPTS[1], SamplingParams(max_new_tokens=3), resume=[1, 2, 3])
