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

import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from .batching import (
    Counters,
    EngineLimits,
    Group,
    decoder_tokens,
    group_size,
    pad_cost,
    prefill_message,
)
from .decode_ahead import prepare_decode
from .errors import GenerationFailed, RequestError, ResourceExhausted
from .gen_stage import GenStage
from .kv_budget import KVBudget
from .request import GenerationResult, RequestHandle, check_token_ids, resumed
from .ring import RingClosed
from .ring_messages import (
    Decode,
    Fail,
    Merge,
    Ping,
    Prefill,
    Release,
    RingMessage,
    Stats,
    Stop,
    Tokens,
)
from .sampling import SamplingParams, context_length
from .special_tokens import eos_and_pad
from .stage_loop import STATS_FIELDS, run_step, serve_generation, stage_message, stage_stats

__all__ = [
    "EngineLimits",
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


@dataclass(frozen=True, slots=True)
class _Command:
    """A request to the scheduler thread from another thread (in its inbox with the ring's
    messages)."""

    kind: Literal["wake", "stop", "stats", "abandon"]
    future: Future[list[dict[str, int]]] | None = None


class RingLike(Protocol):
    """What the scheduler needs of a ring (:class:`Ring`, or the in-process stand-in)."""

    inbox: queue.Queue[Any] | queue.SimpleQueue[Any]
    timeout_s: float

    def send(self, msg: RingMessage) -> None: ...


class GenerationEngine:
    """The scheduler on stage 0.  ``ring``: a :class:`Ring`, an in-process stand-in with its
    ``send``, ``inbox`` and ``timeout_s`` (:class:`~pipeline_core.local_generate.InProcessRing`),
    or None for a one-stage pipeline."""

    def __init__(
        self,
        stage: GenStage,
        ring: RingLike | None,
        limits: EngineLimits | None = None,
        ahead: bool = True,
    ) -> None:
        if stage.index != 0:
            raise ValueError("the scheduler runs on stage 0")
        self.stage, self.ring = stage, ring
        stage.prepares = stage.prepares and ahead  # StageOptions.decode_ahead
        self.limits = limits or EngineLimits()
        self.num_stages = stage.num_stages
        self.max_groups = self.limits.max_groups or 2 * self.num_stages
        cfg = stage.config
        text = cfg.get_text_config(decoder=True)
        self.vocab_size = int(text.vocab_size)
        self.context = context_length(cfg)
        self.context_limit = self.context if self.context is not None else math.inf
        self.can_merge = stage.can_merge
        self.eos, self.pad_id = eos_and_pad(stage.model)
        self.inbox = ring.inbox if ring is not None else queue.Queue()
        self._pending: deque[RequestHandle] = deque()
        self._lock = threading.Lock()
        self._groups: dict[int, Group] = {}
        self._gids = itertools.count()
        self._rids = itertools.count()
        self.budget = KVBudget(self.limits.max_tokens, self.limits.max_sequences)
        self._stats_waiters: deque[Future[list[dict[str, int]]]] = deque()
        self._broken: str | None = None
        self._stopped = threading.Event()
        self.counters = Counters()
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
        prompt = check_token_ids(prompt_ids, self.vocab_size)
        prefix = check_token_ids(resume, self.vocab_size, "resume_token_ids") if resume else []
        if prefix:
            params = resumed(params, prefix)
        params.validate(len(prompt) + len(prefix), self.context)
        for t in params.stop_token_ids:
            if not 0 <= t < self.vocab_size:
                raise RequestError(f"stop token id {t} is outside the vocabulary")
        self.budget.check_request(len(prompt) + params.max_new_tokens)
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
        self.inbox.put(_Command("stats", fut))
        return fut.result(timeout)

    def close(self, timeout: float = 60.0) -> None:
        if self._stopped.is_set():
            return
        self.inbox.put(_Command("stop"))
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
        self.inbox.put(_Command("abandon"))

    @property
    def queue_depth(self) -> int:
        """Requests waiting to be admitted."""
        return len(self._pending)

    def _wake(self) -> None:
        self.inbox.put(_Command("wake"))

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        # an idle ring still sends a message round now and then, so no stage's receive
        # reaches the data-plane timeout (and a dead peer is noticed)
        ping = max(0.5, self.ring.timeout_s / 4) if self.ring is not None else None
        last = time.monotonic()
        timing = self.stage.timing  # the scheduler's share: wait, then the rest of the loop
        while True:
            try:
                timeout = 0.05 if self._pending or self._groups else ping
                tw = time.perf_counter()
                try:
                    item = self.inbox.get(timeout=timeout)
                except queue.Empty:
                    item = None
                t0 = timing.waited(tw)
                if ping is not None and time.monotonic() - last > ping and not self._broken:
                    self.ring.send(Ping())
                    last = time.monotonic()
                if item is not None and not isinstance(item, _Command | RingClosed):
                    last = time.monotonic()  # a ring message came round
                while item is not None:  # this item, then drain what else arrived
                    if isinstance(item, _Command) and item.kind == "stop":
                        self._shutdown()
                        return
                    if isinstance(item, _Command) and item.kind == "abandon":
                        return
                    self._handle(item)
                    try:
                        item = self.inbox.get_nowait()
                    except queue.Empty:
                        item = None
                self._expire_pending()
                self._admit()
                self._prepare_next()
                timing.looped(t0)
            except Exception as e:
                log.exception("generation engine error")
                self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def _handle(self, item: _Command | RingClosed | RingMessage) -> None:
        if isinstance(item, _Command):
            if item.kind == "stats":
                assert item.future is not None
                self._stats_waiters.append(item.future)
                self._send(Stats((stage_stats(self.stage),)))
            return  # "wake": only the admission after handling
        if isinstance(item, RingClosed):
            self._broken = "a stage process is gone"
            self._fail_all(f"the pipeline broke: {self._broken}")
        elif isinstance(item, Tokens):
            self._on_tokens(item.group, item.tokens)
        elif isinstance(item, Fail):
            g = self._groups.pop(item.group, None)
            self.stage.release(item.group)
            if g is not None:
                self._free(g, g.rows)
                for h in g.rows:
                    h._finish("error", item.error)
            for other in [x for x in self._groups.values() if x.parked_on == item.group]:
                other.parked_on = None
                self._advance(other)
        elif isinstance(item, Stats):
            stats = [dict(zip(STATS_FIELDS, s, strict=True)) for s in item.stages]
            if self._stats_waiters:
                self._stats_waiters.popleft().set_result(stats)
        # Ping: it only came round; Stop does not come back before _shutdown waits for it

    def _send(self, msg: RingMessage) -> None:
        """Stage 0's output goes to stage 1, or (one stage) back to the scheduler's inbox, so
        groups interleave there too (and a long generation is a loop, not a recursion)."""
        if self.ring is None:
            self.inbox.put(msg)
        else:
            t0 = time.time()
            self.ring.send(msg)
            t1 = time.time()
            self.stage.send_s += t1 - t0
            self.stage.timing.sent(t1 - t0)
            if isinstance(msg, Prefill | Decode):
                self.stage.timeline.record("send", msg.group, 0, t0, t1)

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

    def _prepare_next(self) -> None:
        """A lone group's step in flight, nothing else to do: make its next step's inputs."""
        lone = [g for g in self._groups.values() if g.busy and g.parked_on is None]
        if len(self._groups) == len(lone) == 1 and not self._pending and self.inbox.empty():
            prepare_decode(self.stage, lone[0].gid)

    def _merge_target(self, g: Group) -> Group | None:
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
            and self.budget.fits(pad_cost(x, g))
        ]
        return min(room, key=lambda x: len(x.rows), default=None)

    def _merge(self, g: Group, other: Group) -> None:
        """Append ``other``'s rows to ``g`` on every stage (``g`` is back at stage 0)."""
        pad = abs(g.seq - other.seq)
        short = other if other.seq < g.seq else g
        for i, h in enumerate(short.rows):
            if not h.done:
                short.reserved[i] += pad
                self.budget.grow(pad)
        self.stage.merge(g.gid, other.gid)
        if self.ring is not None:
            self.ring.send(Merge(g.gid, other.gid))
        g.rows += other.rows
        g.reserved += other.reserved
        g.seq = max(g.seq, other.seq)
        del self._groups[other.gid]
        self.counters.merges += 1

    def _advance(self, g: Group) -> None:
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
                self.ring.send(Release(g.gid))
            return
        keep = None
        if len(stay) < len(g.rows):
            keep = torch.tensor(stay, dtype=torch.long)
            g.rows = [g.rows[i] for i in stay]
            g.reserved = [g.reserved[i] for i in stay]
        tokens = torch.tensor([h.tokens[-1] for h in g.rows], dtype=torch.long)
        g.busy = True
        self._send(run_step(self.stage, Decode(g.gid, keep, tokens, (None,))))

    def _free(self, g: Group, rows: list[RequestHandle]) -> None:
        for h in rows:
            i = g.rows.index(h)
            self.budget.release(g.reserved[i], 1)
            g.reserved[i] = 0

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
                    self.budget.used_rows,
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
                    cost = sum(new_len + decoder_tokens(r) for r in [*rows, h])
                    if not self.budget.fits(cost, len(rows) + 1):
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
        reserved = [length + decoder_tokens(h) for h in rows]
        g = Group(gid, rows, length, reserved)
        self._groups[gid] = g
        self.budget.reserve(sum(reserved), len(rows))
        self.counters.admitted += len(rows)
        self.counters.groups_max = max(self.counters.groups_max, len(self._groups))
        msg = prefill_message(gid, rows, length, self.pad_id, self.stage.enc_dec)
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
                self.ring.send(Release(g.gid))
        self._groups.clear()
        self.budget.clear()
        while self._stats_waiters:
            self._stats_waiters.popleft().set_exception(GenerationFailed(message))

    def _shutdown(self) -> None:
        self._stopped.set()
        self._fail_all("the engine is closed")
        if self.ring is not None and not self._broken:
            self.ring.send(Stop())
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # wait for STOP to come round
                try:
                    item = self.inbox.get(timeout=1)
                except queue.Empty:
                    continue
                if isinstance(item, Stop | RingClosed):
                    break
