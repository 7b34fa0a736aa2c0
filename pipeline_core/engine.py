"""Continuous-batching generation over the ring.

Stage 0 runs the scheduler (:class:`GenerationEngine`) in one thread, which also computes
stage 0; every other stage runs :func:`serve_generation` on its own process.

Sequences that prefill together form a *group* -- one micro-batch, left-padded, with one KV
cache per stage.  Between decode steps the scheduler retires finished rows (EOS, stop ids,
``max_new_tokens``, cancellation, timeout: their cache rows are dropped on every stage with the
group's next step, or the whole group is released) and admits waiting requests as new groups,
which prefill on their own and then *join* a running group: when a group comes back to stage 0
while at least as many other groups as stages are in flight, it waits for the smallest of them
and the two merge on every stage (the shorter left-padded; not for sliding-window caches or
encoder-decoders, whose groups stay apart).  So with S stages, S groups stay busy -- while
stage 1 works on group A, stage 0 works on group B -- and each grows as requests arrive.

A KV budget bounds memory: every row reserves ``prompt + max_new_tokens`` tokens when admitted
(``max_tokens`` in all, ``max_sequences`` rows); a request that cannot fit now waits, one that
can never fit or finds the queue full is refused with a clear reason (:class:`ResourceExhausted`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .gen_stage import GenStage
from .ring import (
    _CLOSED,
    OP_DECODE,
    OP_FAIL,
    OP_MERGE,
    OP_PING,
    OP_PREFILL,
    OP_RELEASE,
    OP_STATS,
    OP_STOP,
    OP_TOKENS,
    Ring,
)
from .sampling import (
    RequestError,
    ResourceExhausted,
    Sampler,
    SamplingParams,
    context_length,
    encode_rows,
)
from .transport import StageFailure

__all__ = [
    "GenerationEngine",
    "GenerationFailed",
    "GenerationResult",
    "RequestHandle",
    "group_size",
    "run_step",
    "serve_generation",
    "stage_message",
]

log = logging.getLogger(__name__)

STATS_FIELDS = ("groups", "sequences", "tokens", "bytes", "steps", "busy_ms")


class GenerationFailed(RuntimeError):
    """The request failed inside the pipeline (a stage raised, or the pipeline broke)."""


@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: str
    """``stop`` (EOS or a stop id), ``length``, ``cancelled``, ``timeout`` or ``error``."""
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class RequestHandle:
    """One request: iterate for tokens as they are produced; :meth:`result` waits for all."""

    def __init__(
        self, rid: int, prompt: list[int], params: SamplingParams, seed: int, wake: Any
    ) -> None:
        self.id, self.prompt, self.params, self.seed = rid, prompt, params, seed
        self.decoder_prefix: list[int] = []
        """An encoder-decoder request's tokens from before a replay (decoder-only: in prompt)."""
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.deadline = self.submitted + params.timeout_s if params.timeout_s else math.inf
        self._cond = threading.Condition()
        self._wake = wake

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating; the request's KV cache is freed on every stage."""
        self.cancelled = True
        self._wake()

    def _push(self, token: int) -> None:
        with self._cond:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.tokens.append(token)
            self._cond.notify_all()

    def _finish(self, reason: str, error: str | None = None) -> None:
        with self._cond:
            if self.finish_reason is None:
                self.finish_reason, self.error = reason, error
            self._cond.notify_all()

    def __iter__(self) -> Iterator[int]:
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda i=i: len(self.tokens) > i or self.done)
                new, done = self.tokens[i:], self.done  # no token is pushed after finishing
            yield from new
            i += len(new)
            if done:
                if self.error is not None:
                    raise GenerationFailed(self.error)
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} not finished after {timeout}s")
        assert self.finish_reason is not None
        return GenerationResult(
            list(self.tokens),
            self.finish_reason,
            len(self.prompt) + len(self.decoder_prefix),  # a replay's earlier tokens: input
            len(self.tokens),
            self.error,
        )


# ---------------------------------------------------------------------------- stage side


def run_step(stage: GenStage, msg: list[Any]) -> list[Any]:
    """Run one PREFILL/DECODE message on ``stage``; returns the message to send on."""
    op, gid = msg[0], msg[1]
    t0 = time.perf_counter()
    w0 = time.time()
    try:
        if op == OP_PREFILL:
            _, _, ids, mask, floats, ints, prefix, payloads = msg
            payloads, logits = stage.prefill(gid, ids, mask, list(payloads), prefix)
            if stage.is_last:
                g = stage.groups[gid]
                assert stage.rules is not None  # the last stage has them
                lens = mask.sum(-1).tolist()
                width = ids.shape[1]
                # each row's prompt: what generate calls the encoder input ids (decoder-only
                # models too), and its own history (else the decoder start)
                prompts = [
                    ids[r, _prompt_cols(stage.enc_dec, n, width)].tolist()
                    for r, n in enumerate(lens)
                ]
                own = [g.ids.shape[1]] * g.rows if stage.enc_dec else lens
                g.sampling = Sampler(floats, ints, own, stage.rules, prompts)
            out = [OP_PREFILL, gid, ids, mask, floats, ints, prefix, tuple(payloads)]
        else:
            _, _, keep, tokens, payloads = msg
            payloads, logits = stage.decode(gid, keep, tokens, list(payloads))
            out = [OP_DECODE, gid, keep, tokens, tuple(payloads)]
        if stage.is_last:
            g = stage.groups[gid]
            assert logits is not None
            out = [OP_TOKENS, gid, g.sampling.choose(g.ids, logits)]
        stage.steps += 1
        stage.busy_s += time.perf_counter() - t0
        rows = int(out[2].shape[0]) if out[0] == OP_TOKENS else stage.groups[gid].rows
        stage.timeline.record("compute", gid, rows, w0, time.time())
        return out
    except Exception as e:  # a bad step fails its group, never the stage
        where = f"stage {stage.index}" + (f", unit {stage.unit}" if stage.unit else "")
        log.warning("[%s] group %d failed: %s", where, gid, e, exc_info=True)
        stage.release(gid)
        return [OP_FAIL, gid, StageFailure(f"{where}: {type(e).__name__}: {e}")]


def _stats(stage: GenStage) -> tuple[int, ...]:
    s = stage.cache_stats()
    return tuple(s[k] for k in STATS_FIELDS)


def stage_message(stage: GenStage, msg: list[Any]) -> list[Any] | None:
    """What stage ``stage.index >= 1`` does with one ring message: the message it sends on
    (None: nothing).  Shared by :func:`serve_generation` and the in-process ring."""
    op = msg[0]
    if op in (OP_PREFILL, OP_DECODE):
        return run_step(stage, msg)
    if op == OP_RELEASE:
        stage.release(msg[1])
        return None if stage.is_last else msg
    if op == OP_MERGE:
        stage.merge(msg[1], msg[2])
        return None if stage.is_last else msg
    if op == OP_FAIL:
        stage.release(msg[1])
        return msg
    if op == OP_STATS:
        return [OP_STATS, (*msg[1], _stats(stage))]
    return msg  # PING (the last stage sends it on to stage 0, which drops it), STOP


def serve_generation(stage: GenStage, ring: Ring) -> None:
    """Serve stage ``stage.index >= 1`` until stage 0 sends STOP."""
    while True:
        t0 = time.time()
        msg = ring.recv()
        op = msg[0]
        compute = op in (OP_PREFILL, OP_DECODE)
        if compute:
            t1 = time.time()
            stage.timeline.record("wait", msg[1], 0, t0, t1)
            stage.wait_s += t1 - t0
        out = stage_message(stage, msg)
        t2 = time.time()
        if out is not None:
            ring.send(out)
        if compute:
            t3 = time.time()
            stage.timeline.record("send", msg[1], 0, t2, t3)
            stage.send_s += t3 - t2
        if op == OP_STOP:
            return


# ---------------------------------------------------------------------------- scheduler


def _prompt_cols(enc_dec: bool, n: int, width: int) -> slice:
    """Where a prompt of ``n`` tokens sits in a micro-batch ``width`` wide.  A decoder-only
    prompt is left-padded (every row's next token follows its last); an encoder's input is
    right-padded, as its tokenizer pads it, so that absolute positions (BART, Marian, ...) start
    at 0 in every row, as when run alone."""
    return slice(0, n) if enc_dec else slice(width - n, width)


def _decoder_tokens(h: RequestHandle) -> int:
    """KV tokens a request adds beyond its prompt (a replayed decoder prefix too)."""
    return len(h.decoder_prefix) + h.params.max_new_tokens


def group_size(pending: int, running: int, groups: int, stages: int, max_rows: int) -> int:
    """Rows for a new group: the waiting requests spread over the stages without a group,
    but never more than an even share of all rows (``running`` + ``pending``) per stage, so a
    burst that arrives while the first group starts does not all land in the second.  Rows left
    over start a group of their own that then merges into the smallest running group."""
    free = max(1, stages - groups)
    share = math.ceil((running + pending) / stages)
    return max(1, min(math.ceil(pending / free), share, max_rows))


@dataclass
class _Group:
    gid: int
    rows: list[RequestHandle]
    seq: int
    """Cache length (padded) once the last token returned is appended."""
    reserved: list[int]
    busy: bool = True
    parked_on: int | None = None
    """Waiting at stage 0 to merge into this (in-flight) group when it comes back."""


@dataclass
class EngineLimits:
    max_tokens: int = 65536
    """KV budget: sum over admitted rows of ``padded prompt + max_new_tokens``."""
    max_sequences: int = 256
    max_rows_per_group: int = 32
    max_groups: int = 0
    """Groups in flight (0: twice the number of stages)."""
    max_queue: int = 4096


class RingLike(Protocol):
    """What the scheduler needs of a ring (:class:`Ring`, or the in-process stand-in)."""

    inbox: queue.Queue[Any]
    timeout_s: float

    def send(self, values: list[Any]) -> None: ...


@dataclass
class _Counters:
    admitted: int = 0
    finished: int = 0
    tokens: int = 0
    steps: int = 0
    groups_max: int = 0
    merges: int = 0


class GenerationEngine:
    """The scheduler on stage 0.  ``ring``: a :class:`Ring`, an in-process stand-in with its
    ``send``, ``inbox`` and ``timeout_s`` (:class:`~pipeline_core.local_generate.InProcessRing`),
    or None for a one-stage pipeline."""

    def __init__(
        self,
        stage: GenStage,
        ring: RingLike | None,
        limits: EngineLimits | None = None,
    ) -> None:
        if stage.index != 0:
            raise ValueError("the scheduler runs on stage 0")
        self.stage, self.ring = stage, ring
        self.limits = limits or EngineLimits()
        self.num_stages = stage.num_stages
        self.max_groups = self.limits.max_groups or 2 * self.num_stages
        cfg = stage.config
        text = cfg.get_text_config(decoder=True)
        self.vocab_size = int(text.vocab_size)
        self.context = context_length(cfg)
        self.context_limit = self.context if self.context is not None else math.inf
        self.can_merge = stage.can_merge
        gen = getattr(stage.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = getattr(text, "eos_token_id", None)
        self.eos: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = getattr(gen, "pad_token_id", None)
        if pad is None:
            pad = getattr(text, "pad_token_id", None)
        if pad is None:
            pad = min(self.eos, default=0)
        self.pad_id = int(pad) if 0 <= int(pad) < self.vocab_size else 0  # masked out anyway
        self.inbox: queue.Queue[Any] = ring.inbox if ring is not None else queue.Queue()
        self._pending: deque[RequestHandle] = deque()
        self._lock = threading.Lock()
        self._groups: dict[int, _Group] = {}
        self._gids = itertools.count()
        self._rids = itertools.count()
        self._used_tokens = 0
        self._used_rows = 0
        self._stats_waiters: deque[Future[list[dict[str, int]]]] = deque()
        self._broken: str | None = None
        self._stopped = threading.Event()
        self.counters = _Counters()
        self._thread = threading.Thread(target=self._loop, name="pipeserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client API

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        resume: Sequence[int] = (),
    ) -> RequestHandle:
        """Queue one request; raises :class:`RequestError` / :class:`ResourceExhausted`.

        ``resume``: tokens this request already generated (a replay after a lost worker); it
        continues after them, its seeded draws included, as if never interrupted."""
        params = params or SamplingParams()
        prompt = self._check_prompt(prompt_ids)
        prefix = self._check_prompt(resume, "resume_token_ids") if resume else []
        if prefix:
            if len(prefix) >= params.max_new_tokens:
                raise RequestError(
                    f"resume_token_ids ({len(prefix)}) already reach max_new_tokens "
                    f"({params.max_new_tokens}); nothing is left to generate"
                )
            params = dataclasses.replace(
                params,
                max_new_tokens=params.max_new_tokens - len(prefix),
                step_offset=params.step_offset + len(prefix),
            )
        params.validate(len(prompt) + len(prefix), self.context)
        for t in params.stop_token_ids:
            if not 0 <= t < self.vocab_size:
                raise RequestError(f"stop token id {t} is outside the vocabulary")
        need = len(prompt) + params.max_new_tokens
        if need > self.limits.max_tokens:
            raise ResourceExhausted(
                f"the request needs {need} KV tokens (prompt + max_new_tokens) but the KV "
                f"budget is {self.limits.max_tokens}; ask for fewer tokens"
            )
        if self._broken:
            raise GenerationFailed(f"the pipeline is down: {self._broken}")
        if self._stopped.is_set():
            raise GenerationFailed("the engine is closed")
        with self._lock:
            if len(self._pending) >= self.limits.max_queue:
                raise ResourceExhausted(
                    f"the queue is full ({len(self._pending)} requests waiting); retry later"
                )
            # an encoder reads only the prompt; a decoder-only model reads the replayed tokens
            # as more prompt
            enc_dec = self.stage.enc_dec
            rid, seed = next(self._rids), params.resolved_seed()
            h = RequestHandle(rid, prompt if enc_dec else prompt + prefix, params, seed, self._wake)
            if enc_dec:
                h.decoder_prefix = prefix
            self._pending.append(h)
        self._wake()
        return h

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None
    ) -> list[list[int]]:
        """Generate for every prompt (all in flight together); the new tokens per prompt."""
        handles = [self.submit(p, params) for p in prompts]
        out = []
        for h in handles:
            r = h.result()
            if r.error:
                raise GenerationFailed(r.error)
            out.append(r.tokens)
        return out

    def stats(self, timeout: float = 60.0) -> list[dict[str, int]]:
        """Per stage: groups, sequences, cached tokens and KV bytes (through the ring)."""
        fut: Future[list[dict[str, int]]] = Future()
        self.inbox.put(("stats", fut))
        return fut.result(timeout)

    def close(self, timeout: float = 60.0) -> None:
        if self._stopped.is_set():
            return
        self.inbox.put(("stop",))
        self._thread.join(timeout)

    def abandon(self, reason: str) -> None:
        """The pipeline is broken: fail every request now and stop, sending nothing on the
        ring (its peers may be gone).  Safe to call from any thread."""
        self._broken = reason
        self._stopped.set()
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        for h in pending:
            h._finish("error", reason)
        for g in list(self._groups.values()):
            for h in g.rows:
                h._finish("error", reason)
        self.inbox.put(("abandon",))

    @property
    def queue_depth(self) -> int:
        """Requests waiting to be admitted."""
        return len(self._pending)

    def _wake(self) -> None:
        self.inbox.put(("wake",))

    def _check_prompt(self, prompt_ids: Sequence[int], what: str = "prompt") -> list[int]:
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError) as e:
            raise RequestError(f"{what} must be a list of token ids: {e}") from e
        if not prompt:
            raise RequestError(f"the {what} is empty; give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(
                f"{what}: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )
        return prompt

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        # an idle ring still sends a message round now and then, so no stage's receive
        # reaches the data-plane timeout (and a dead peer is noticed)
        ping = max(0.5, self.ring.timeout_s / 4) if self.ring is not None else None
        last = time.monotonic()
        while True:
            try:
                timeout = 0.05 if self._pending or self._groups else ping
                try:
                    item = self.inbox.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if ping is not None and time.monotonic() - last > ping and not self._broken:
                    self.ring.send([OP_PING])
                    last = time.monotonic()
                if isinstance(item, list):
                    last = time.monotonic()
                if isinstance(item, tuple) and item[0] == "stop":
                    self._shutdown()
                    return
                if isinstance(item, tuple) and item[0] == "abandon":
                    return
                self._handle(item)
                while True:  # drain what else arrived
                    try:
                        item = self.inbox.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, tuple) and item[0] == "stop":
                        self._shutdown()
                        return
                    if isinstance(item, tuple) and item[0] == "abandon":
                        return
                    self._handle(item)
                self._expire_pending()
                self._admit()
            except Exception as e:
                log.exception("generation engine error")
                self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def _handle(self, item: Any) -> None:
        if item is None or (isinstance(item, tuple) and item[0] == "wake"):
            return
        if item is _CLOSED:
            self._broken = "a stage process is gone"
            self._fail_all(f"the pipeline broke: {self._broken}")
            return
        if isinstance(item, tuple) and item[0] == "stats":
            self._stats_waiters.append(item[1])
            self._send([OP_STATS, (_stats(self.stage),)])
            return
        op = item[0]
        if op == OP_PING:
            return
        if op == OP_TOKENS:
            self._on_tokens(item[1], item[2])
        elif op == OP_FAIL:
            g = self._groups.pop(item[1], None)
            self.stage.release(item[1])
            if g is not None:
                self._free(g, g.rows)
                for h in g.rows:
                    h._finish("error", item[2].message)
            for other in [x for x in self._groups.values() if x.parked_on == item[1]]:
                other.parked_on = None
                self._advance(other)
        elif op == OP_STATS:
            stats = [dict(zip(STATS_FIELDS, s, strict=True)) for s in item[1]]
            if self._stats_waiters:
                self._stats_waiters.popleft().set_result(stats)

    def _send(self, msg: list[Any]) -> None:
        """Stage 0's output goes to stage 1, or (one stage) back to the scheduler's inbox, so
        groups interleave there too (and a long generation is a loop, not a recursion)."""
        if self.ring is None:
            self.inbox.put(msg)
        else:
            t0 = time.time()
            self.ring.send(msg)
            t1 = time.time()
            self.stage.send_s += t1 - t0
            if msg[0] in (OP_PREFILL, OP_DECODE):
                self.stage.timeline.record("send", msg[1], 0, t0, t1)

    def _on_tokens(self, gid: int, tokens: torch.Tensor) -> None:
        g = self._groups.get(gid)
        if g is None:
            return
        g.busy = False
        g.seq += 1
        self.counters.steps += 1
        self.counters.tokens += len(g.rows)
        now = time.monotonic()
        for h, tok in zip(g.rows, tokens.tolist(), strict=True):
            if h.done:
                continue
            h._push(tok)
            p = h.params
            own = len(h.prompt) + len(h.decoder_prefix) + len(h.tokens)
            if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
                h._finish("stop")
            elif len(h.tokens) >= p.max_new_tokens or own >= self.context_limit:
                h._finish("length")
            elif now > h.deadline:
                h._finish("timeout")
        for other in [x for x in self._groups.values() if x.parked_on == gid]:
            self._merge(g, other)
        target = self._merge_target(g)
        if target is not None:
            g.parked_on = target.gid  # joins ``target`` when it comes back; no step of its own
            return
        self._advance(g)

    def _merge_target(self, g: _Group) -> _Group | None:
        """An in-flight group for ``g`` to join, if enough groups stay in flight without it."""
        if not self.can_merge:
            return None
        flying = [x for x in self._groups.values() if x.busy and x.gid != g.gid]
        if len(flying) < self.num_stages:
            return None
        room = [
            x
            for x in flying
            if len(x.rows) + len(g.rows) <= self.limits.max_rows_per_group
            and self._used_tokens + self._pad_cost(x, g) <= self.limits.max_tokens
        ]
        return min(room, key=lambda x: len(x.rows), default=None)

    @staticmethod
    def _pad_cost(a: _Group, b: _Group) -> int:
        """KV tokens that left-padding the shorter group adds when ``a`` and ``b`` merge."""
        short = b if b.seq < a.seq else a
        return abs(a.seq - b.seq) * sum(1 for h in short.rows if not h.done)

    def _merge(self, g: _Group, other: _Group) -> None:
        """Append ``other``'s rows to ``g`` on every stage (``g`` is back at stage 0)."""
        pad = abs(g.seq - other.seq)
        short = other if other.seq < g.seq else g
        for i, h in enumerate(short.rows):
            if not h.done:
                short.reserved[i] += pad
                self._used_tokens += pad
        self.stage.merge(g.gid, other.gid)
        if self.ring is not None:
            self.ring.send([OP_MERGE, g.gid, other.gid])
        g.rows += other.rows
        g.reserved += other.reserved
        g.seq = max(g.seq, other.seq)
        del self._groups[other.gid]
        self.counters.merges += 1

    def _advance(self, g: _Group) -> None:
        """Next step of a group whose tokens came back: retire rows, then decode the rest."""
        now = time.monotonic()
        for h in g.rows:
            if not h.done and h.cancelled:
                h._finish("cancelled")
            elif not h.done and now > h.deadline:
                h._finish("timeout")
        stay = [i for i, h in enumerate(g.rows) if not h.done]
        leaving = [h for h in g.rows if h.done]
        if leaving:
            self._free(g, leaving)
            self.counters.finished += len(leaving)
        if not stay:
            del self._groups[g.gid]
            self.stage.release(g.gid)
            if self.ring is not None:
                self.ring.send([OP_RELEASE, g.gid])
            return
        keep = None
        if len(stay) < len(g.rows):
            keep = torch.tensor(stay, dtype=torch.long)
            g.rows = [g.rows[i] for i in stay]
            g.reserved = [g.reserved[i] for i in stay]
        tokens = torch.tensor([h.tokens[-1] for h in g.rows], dtype=torch.long)
        g.busy = True
        self._send(run_step(self.stage, [OP_DECODE, g.gid, keep, tokens, (None,)]))

    def _free(self, g: _Group, rows: list[RequestHandle]) -> None:
        for h in rows:
            i = g.rows.index(h)
            self._used_tokens -= g.reserved[i]
            g.reserved[i] = 0
            self._used_rows -= 1

    def _expire_pending(self) -> None:
        now = time.monotonic()
        with self._lock:
            keep: deque[RequestHandle] = deque()
            for h in self._pending:
                if h.cancelled:
                    h._finish("cancelled")
                elif now > h.deadline:
                    h._finish("timeout")
                else:
                    keep.append(h)
            self._pending = keep
        for g in list(self._groups.values()):
            if not g.busy and g.parked_on is None:  # normally every group is in flight
                self._advance(g)

    def _admit(self) -> None:
        lim = self.limits
        while self._pending and len(self._groups) < self.max_groups:
            with self._lock:
                want = group_size(
                    len(self._pending),
                    self._used_rows,
                    len(self._groups),
                    self.num_stages,
                    lim.max_rows_per_group,
                )
                rows: list[RequestHandle] = []
                length = 0
                for h in self._pending:
                    if len(rows) >= want:
                        break
                    if rows and len(h.decoder_prefix) != len(rows[0].decoder_prefix):
                        break  # encoder-decoder replays share a group with equal prefixes only
                    new_len = max(length, len(h.prompt))
                    cost = sum(new_len + _decoder_tokens(r) for r in [*rows, h])
                    if (
                        self._used_tokens + cost > lim.max_tokens
                        or self._used_rows + len(rows) + 1 > lim.max_sequences
                    ):
                        break
                    rows.append(h)
                    length = new_len
                if not rows:
                    return  # the oldest request waits for KV budget to free up
                for _ in rows:
                    self._pending.popleft()
            self._start_group(rows, length)

    def _start_group(self, rows: list[RequestHandle], length: int) -> None:
        gid = next(self._gids)
        reserved = [length + _decoder_tokens(h) for h in rows]
        g = _Group(gid, rows, length, reserved)
        self._groups[gid] = g
        self._used_tokens += sum(reserved)
        self._used_rows += len(rows)
        self.counters.admitted += len(rows)
        self.counters.groups_max = max(self.counters.groups_max, len(self._groups))
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, h in enumerate(rows):
            cols = _prompt_cols(self.stage.enc_dec, len(h.prompt), length)
            ids[r, cols] = torch.tensor(h.prompt)
            mask[r, cols] = 1
        floats, ints = encode_rows([h.params for h in rows], [h.seed for h in rows])
        npass = 2 if self.stage.enc_dec else 1
        prefix = torch.tensor([h.decoder_prefix for h in rows]) if rows[0].decoder_prefix else None
        msg = [OP_PREFILL, gid, ids, mask, floats, ints, prefix, (None,) * npass]
        self._send(run_step(self.stage, msg))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        for h in pending:
            h._finish("error", message)
        for g in list(self._groups.values()):
            for h in g.rows:
                h._finish("error", message)
            self.stage.release(g.gid)
            if self.ring is not None and not self._broken:
                self.ring.send([OP_RELEASE, g.gid])
        self._groups.clear()
        self._used_tokens = self._used_rows = 0
        while self._stats_waiters:
            self._stats_waiters.popleft().set_exception(GenerationFailed(message))

    def _shutdown(self) -> None:
        self._stopped.set()
        self._fail_all("the engine is closed")
        if self.ring is not None and not self._broken:
            self.ring.send([OP_STOP])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # wait for STOP to come round
                try:
                    item = self.inbox.get(timeout=1)
                except queue.Empty:
                    continue
                if (isinstance(item, list) and item[0] == OP_STOP) or item is _CLOSED:
                    break
