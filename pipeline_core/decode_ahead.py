"""Decode ahead: a later stage runs its part of the next decode step before the step arrives.

At batch 1 one stage computes at a time; the others wait for their next message.  Most of a
later stage's own Python per token is the model's code *before* its first layer: preparing the
inputs, the causal mask, the rotary tables, the units it skips (issue 23 measured ~1 ms per
stage on this CPU).  None of that depends on the step's activations or on the token's value
-- only on lengths.  So right after a stage sends a decode step on, it starts the same group's
next step and runs it up to the hooked call where the previous stage's payload comes in
(``GroupState.ahead_call``, learnt from the last plain step), and only there blocks on the
ring.  When the message is that step, the new tokens are written into the ids (only their
shape was used so far), the payload is injected and the step runs on: the work before the
layers was done while the earlier stages computed.  Any other message (another group's, rows
leaving, a merge, a control message) undoes the preparation -- the ids and model kwargs are put
back; nothing else has changed: an owned unit never runs before the payload, the cache's
phantom lengths advance only after a completed pass -- and the message is handled as usual.

Only a lone group of a decoder-only model is run ahead (:meth:`GenStage.can_decode_ahead`).
Stage 0 waits for the tokens themselves; its scheduler only makes the next step's model inputs
while a lone group's step is in flight (:func:`prepare_decode`), its pass runs when they come.
``StageOptions.decode_ahead`` (``PIPESERVE_DECODE_AHEAD=0``) turns both off.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import AheadMiss
from .gen_stage import GenStage
from .ring import Ring
from .ring_messages import Decode, RingMessage
from .stage_hooks import Payload

__all__ = ["Ahead", "decode_ahead", "prepare_decode", "run_ahead"]

log = logging.getLogger(__name__)

Fetch = Callable[[], tuple[torch.Tensor, Any] | None]
"""Blocks for the step's message: its ``(tokens, payloads)``, or None when another came."""


@torch.no_grad()
def decode_ahead(
    stage: GenStage, gid: int, fetch: Fetch
) -> tuple[list[Any], torch.Tensor | None] | None:
    """Group ``gid``'s next decode step on ``stage``, run ahead of its message (see module
    docstring): what :meth:`GenStage.decode` returns, or None when ``fetch`` brought another
    message (or none: the pass ended before the call) and the preparation was undone."""
    g = stage.groups[gid]
    call, ids, kwargs = g.ahead_call, g.ids, g.kwargs
    assert call is not None

    def arrive() -> Payload:
        got = fetch()
        if got is None or int(got[0].numel()) != g.rows:
            raise AheadMiss
        dec = Payload.from_wire(got[1][-1], stage.device)
        if dec is None or dec.call != call:
            raise AheadMiss
        g.ids[:, -1] = got[0].to(stage.device)
        return dec

    g.ids, g.kwargs = stage.grown(g)
    try:
        return stage._decoder_pass(g, prefill=False, payloads=[None], ahead=(call, arrive))
    except AheadMiss:
        g.ids, g.kwargs = ids, kwargs
        return None


@functools.cache
def _generate_inputs(cls: type) -> bool:
    """Whether model class ``cls`` prepares its inputs with ``generate``'s own code."""
    from transformers import GenerationMixin

    own = cls.prepare_inputs_for_generation
    return own is GenerationMixin.prepare_inputs_for_generation


@torch.no_grad()
def prepare_decode(stage: GenStage, gid: int) -> bool:
    """Stage 0, while group ``gid``'s step is in flight: make its next decode step's model
    inputs now -- the model kwargs moved on a token, the ids grown by a placeholder,
    ``prepare_inputs_for_generation`` -- off the token's path (none of it depends on the
    token's value, only on lengths; ~0.3 ms a token on a 2-core CPU).  The step
    (:meth:`GenStage.decode`) writes the token in and runs the pass from there
    (:meth:`GroupState.take_prepared`: rows leaving, a merge, any row change drop it and the
    step runs as before).  Only for a decoder-only model with ``generate``'s own input
    preparation (its ``input_ids`` are a copy of the ids' last column); returns whether it
    prepared."""
    g = stage.groups.get(gid)
    if g is None or g.prepared is not None or not stage.prepares or stage.enc_dec:
        return False
    if not _generate_inputs(type(stage.model)):
        return False
    t0 = time.perf_counter()
    stage._settle(g)  # the inputs may read the cache's length
    ids, kwargs = stage.grown(g)
    inputs = stage._model_inputs(ids, kwargs, prefill=False)
    tok = inputs.get("input_ids")
    if not isinstance(tok, torch.Tensor) or tuple(tok.shape) != (g.rows, 1):
        stage.prepares = False  # not generate's usual inputs: never again on this stage
        return False
    g.prepared = (g.ids, ids, kwargs, inputs)
    if stage.timing.on:  # a step's own Python, run ahead (in stage 0's scheduler loop)
        dt = time.perf_counter() - t0
        stage.timing.step_s += dt
        stage.timing.ahead_s += dt
    return True


@dataclass
class Ahead:
    """A decode step run before its message came (:func:`run_ahead`)."""

    t0: float
    """``perf_counter`` when the step began (before the message)."""
    w0: float
    """Wall clock then."""
    wait_s: float = 0.0
    """Blocked for the message inside the step (not part of the step's work)."""
    w_wait: float = 0.0
    """Wall clock when that wait began."""
    result: tuple[list[Any], Any] | BaseException | None = None
    """What :meth:`GenStage.decode` would have returned, or what it raised; None: the message
    that came is another one."""


def run_ahead(stage: GenStage, ring: Ring, gid: int) -> tuple[RingMessage | None, Ahead]:
    """Run group ``gid``'s next decode step on ``stage`` ahead of its message from ``ring``.
    Returns the message that came (None: none was taken, receive as usual) and the step."""
    ahead = Ahead(time.perf_counter(), time.time())
    came: list[RingMessage] = []

    def fetch() -> tuple[torch.Tensor, Any] | None:
        t, ahead.w_wait = time.perf_counter(), time.time()
        msg = ring.recv()
        ahead.wait_s = time.perf_counter() - t
        came.append(msg)
        if not (isinstance(msg, Decode) and msg.group == gid and msg.keep is None):
            return None
        if stage.timing.on:
            stage.timing.ahead_s += t - ahead.t0
        return msg.tokens, msg.payloads

    try:
        ahead.result = decode_ahead(stage, gid, fetch)
        if ahead.result is not None:
            stage.ahead_steps += 1
        elif came:
            stage.ahead_misses += 1
    except ConnectionError:
        raise  # the ring broke (in ring.recv): the stage ends, as on a plain receive
    except Exception as e:
        if not came:  # failed while preparing: the plain step meets it (or not) by itself
            log.debug("[stage %d] decode ahead of group %d: %s", stage.index, gid, e)
            stage.groups[gid].ahead_call = None
        ahead.result = e
    return (came[0] if came else None), ahead
