"""The per-stage step loop of generation: what every stage does with a ring message.

Stages ``1..S-1`` run :func:`serve_generation` on their own process (or, in one process, on
a thread each: :class:`~pipeline_core.local_generate.InProcessRing`);
stage 0's scheduler (:mod:`.engine`) calls :func:`run_step` for its own part of each step.  The
last stage chooses the tokens and sends them back to stage 0 (:class:`Tokens`).
"""

from __future__ import annotations

import logging
import time

from .decode_ahead import Ahead, run_ahead
from .gen_stage import GenStage
from .ring import Ring
from .ring_messages import (
    Decode,
    Fail,
    Merge,
    Prefill,
    Release,
    RingMessage,
    Stats,
    Stop,
    Tokens,
)
from .sampling import Sampler
from .step_timing import TIMING_FIELDS

__all__ = [
    "STATS_FIELDS",
    "prompt_cols",
    "run_step",
    "serve_generation",
    "stage_message",
    "stage_stats",
]

log = logging.getLogger(__name__)

STATS_FIELDS = ("groups", "sequences", "tokens", "bytes", "steps", "busy_ms", *TIMING_FIELDS)


def prompt_cols(enc_dec: bool, n: int, width: int) -> slice:
    """Where a prompt of ``n`` tokens sits in a micro-batch ``width`` wide.  A decoder-only
    prompt is left-padded (every row's next token follows its last); an encoder's input is
    right-padded, as its tokenizer pads it, so that absolute positions (BART, Marian, ...) start
    at 0 in every row, as when run alone."""
    return slice(0, n) if enc_dec else slice(width - n, width)


def run_step(
    stage: GenStage,
    msg: Prefill | Decode,
    ahead: Ahead | None = None,
) -> Prefill | Decode | Tokens | Fail:
    """Run one step on ``stage``; returns the message to send on (the last stage: the
    tokens; a failure: :class:`Fail`, the stage stays up).  ``ahead``: the step was already
    run before ``msg`` came (:mod:`.decode_ahead`); only its result is sent on here."""
    gid = msg.group
    t0, w0 = (ahead.t0, ahead.w0) if ahead is not None else (time.perf_counter(), time.time())
    try:
        out: Prefill | Decode | Tokens
        if isinstance(msg, Prefill):
            ids, mask = msg.ids, msg.mask
            payloads, logits = stage.prefill(gid, ids, mask, list(msg.payloads), msg.decoder_prefix)
            if stage.is_last:
                g = stage.groups[gid]
                assert stage.rules is not None  # the last stage has them
                lens = mask.sum(-1).tolist()
                width = ids.shape[1]
                # each row's prompt: what generate calls the encoder input ids (decoder-only
                # models too), and its own history (else the decoder start)
                prompts = [
                    ids[r, prompt_cols(stage.enc_dec, n, width)].tolist()
                    for r, n in enumerate(lens)
                ]
                own = [g.ids.shape[1]] * g.rows if stage.enc_dec else lens
                g.sampling = Sampler(msg.floats, msg.ints, own, stage.rules, prompts)
            out = Prefill(gid, ids, mask, msg.floats, msg.ints, msg.decoder_prefix, tuple(payloads))
        else:
            if ahead is None:
                payloads, logits = stage.decode(gid, msg.keep, msg.tokens, list(msg.payloads))
            elif isinstance(ahead.result, BaseException):
                raise ahead.result
            else:
                payloads, logits = ahead.result
            out = Decode(gid, msg.keep, msg.tokens, tuple(payloads))
        if stage.is_last:
            g = stage.groups[gid]
            assert logits is not None
            ts = time.perf_counter()
            out = Tokens(gid, g.sampling.choose(g.ids, logits))
            if stage.timing.on:
                stage.timing.sample_s += time.perf_counter() - ts
        busy = time.perf_counter() - t0 - (ahead.wait_s if ahead is not None else 0.0)
        stage.steps += 1
        stage.busy_s += busy
        if stage.timing.on:
            stage.timing.steps += 1
            stage.timing.step_s += busy
        rows = int(out.tokens.shape[0]) if isinstance(out, Tokens) else stage.groups[gid].rows
        stage.timeline.record("compute", gid, rows, w0, time.time())
        return out
    except Exception as e:  # a bad step fails its group, never the stage
        where = f"stage {stage.index}" + (f", unit {stage.unit}" if stage.unit else "")
        log.warning("[%s] group %d failed: %s", where, gid, e, exc_info=True)
        stage.release(gid)
        return Fail(gid, f"{where}: {type(e).__name__}: {e}")


def stage_stats(stage: GenStage) -> tuple[int, ...]:
    """``stage``'s figures in :data:`STATS_FIELDS` order."""
    s = stage.cache_stats()
    return tuple(s[k] for k in STATS_FIELDS)


def stage_message(
    stage: GenStage, msg: RingMessage, ahead: Ahead | None = None
) -> RingMessage | None:
    """What stage ``stage.index >= 1`` does with one ring message: the message it sends on
    (None: nothing).  ``ahead``: ``msg``'s step, already run (:func:`run_step`)."""
    if isinstance(msg, Prefill | Decode):
        return run_step(stage, msg, ahead)
    if isinstance(msg, Release):
        stage.release(msg.group)
        return None if stage.is_last else msg
    if isinstance(msg, Merge):
        stage.merge(msg.group, msg.other)
        return None if stage.is_last else msg
    if isinstance(msg, Fail):
        stage.release(msg.group)
        return msg
    if isinstance(msg, Stats):
        return Stats((*msg.stages, stage_stats(stage)))
    return msg  # Ping (the last stage sends it on to stage 0, which drops it), Stop, Tokens


def serve_generation(stage: GenStage, ring: Ring, *, ahead: bool = True) -> None:
    """Serve stage ``stage.index >= 1`` until stage 0 sends :class:`Stop`.  ``ahead``: run a
    lone group's decode steps ahead of their messages (:mod:`.decode_ahead`)."""
    last: int | None = None  # the group of the last step
    while True:
        t0 = time.time()
        msg: RingMessage | None = None
        done: Ahead | None = None
        if ahead and last is not None and not ring.waiting() and stage.can_decode_ahead(last):
            msg, done = run_ahead(stage, ring, last)
            if done.result is None or msg is None:
                done = None  # another message came (or none was taken): handle it as usual
        if msg is None:
            msg = ring.recv()
            assert msg is not None  # no timeout: a message, or ConnectionError
        compute = isinstance(msg, Prefill | Decode)
        if compute:
            t1 = time.time()
            start, wait = (done.w_wait, done.wait_s) if done is not None else (t0, t1 - t0)
            stage.timeline.record("wait", msg.group, 0, start, start + wait)
            stage.wait_s += wait
            if stage.timing.on:
                stage.timing.wait_s += wait
            last = msg.group
        out = stage_message(stage, msg, done)
        t2 = time.time()
        if out is not None:
            ring.send(out)
        if compute:
            t3 = time.time()
            stage.timeline.record("send", msg.group, 0, t2, t3)
            stage.send_s += t3 - t2
            stage.timing.sent(t3 - t2)
        if isinstance(msg, Stop):
            return
