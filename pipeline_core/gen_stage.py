"""A generation stage: the plan's units of the original Hugging Face model, with a KV cache.

``torch.export`` cannot carry a KV cache, so for generation each stage rebuilds the HF model
skeleton on the meta device, loads only its units' tensors (the same plan, the same shard
loader as the forward stages) and runs the model's *own* ``forward`` -- with hooks, so one
generic runner serves every family:

* a unit the stage does not own is never computed: a layer returns its input unchanged, any
  other module (an embedding, a norm) returns zeros of the right shape, worked out on meta;
* at the unit where the previous stage stopped, the hook injects what that stage sent (the
  hidden states, plus any other argument produced by an earlier layer -- T5's position bias);
* at the first unit after its own that it does not own, the stage stops (:class:`StageExit`)
  and sends the arguments of that call.

Masks, positions, rotary tables and ALiBi biases are recomputed on every stage by the model's
own code from the (tiny) token ids and attention mask that travel with each step.  Each stage
keeps an HF cache object holding tensors only for its own layers; the other layers of the
cache are *phantoms* ``[batch, 1, length, 1]`` wide that only track lengths, so masks and cache
queries behave exactly as in one process.

An encoder-decoder model (T5) runs two passes on a prefill: the encoder pass (once per
request) and the decoder pass; the finished encoder output travels with the decoder
activations to the stages that need it for cross-attention, and cross-attention caches live
on the stage owning each decoder layer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

from .compiled_step import CompiledDecode, CompileSettings, attach
from .errors import AheadMiss, PlanError, StageExit, StageSkip, UnsupportedModelError
from .gen_group import GroupState, cache_bytes, merge_groups, select_rows
from .gen_support import SUPPORTED_FAMILIES, check_supported, decoder_layers
from .kv_cache import advance_phantoms, grow_in_place
from .load import ReadStats
from .logits_rules import LogitsRules
from .plan import Plan
from .skipped_units import SkippedUnits
from .source import build_skeleton, parse_dtype
from .special_tokens import decoder_start_id
from .stage_hooks import (
    PassCtx,
    Payload,
    around,
    bind,
    capture,
    inject,
    out_tensors,
)
from .step_fastpath import cache_module_list_slices
from .step_timing import StepTimes
from .timeline import Timeline
from .unit_load import load_units

__all__ = ["SUPPORTED_FAMILIES", "GenStage", "GroupState", "StageExit", "UnsupportedModelError"]

log = logging.getLogger(__name__)


class GenStage(SkippedUnits):
    """Stage ``index`` of ``plan`` built for KV-cached generation (see module docstring)."""

    def __init__(
        self,
        plan: Plan,
        index: int,
        device: torch.device | str = "cpu",
        *,
        stats: ReadStats | None = None,
        step_timing: bool = False,
        compile_decode: CompileSettings | bool | None = None,
        huge_pages: bool = True,
    ) -> None:
        if not 0 <= index < plan.num_stages:
            raise PlanError(f"stage {index} does not exist; the plan has {plan.num_stages} stages")
        if not plan.source.is_hf:
            raise UnsupportedModelError(
                "generation needs a Hugging Face causal-LM or encoder-decoder checkpoint "
                f"(supported: {', '.join(SUPPORTED_FAMILIES)}); a factory model can only be "
                "run with forward"
            )
        self.plan, self.index, self.device = plan, index, torch.device(device)
        self.num_stages = plan.num_stages
        self.is_first, self.is_last = index == 0, index == plan.num_stages - 1
        self.stats = stats if stats is not None else ReadStats()
        model = build_skeleton(plan.source, parse_dtype(plan.dtype), traceable=False)
        self.model = model
        self.config = model.config
        check_supported(model)
        self.enc_dec = bool(getattr(self.config, "is_encoder_decoder", False))
        names = plan.stages[index].units
        unit_mods: dict[int, nn.Module] = {}
        self._names: dict[int, str] = {}
        for u in plan.units:
            m = model.get_submodule(u["name"])
            unit_mods.setdefault(id(m), m)
            self._names.setdefault(id(m), u["name"])
        self._owned = {id(model.get_submodule(n)) for n in names}
        load_units(model, plan, names, self.device, self.stats, index, huge_pages=huge_pages)
        self._has_meta: dict[int, bool] = {
            k: any(p.is_meta for p in m.parameters()) for k, m in unit_mods.items()
        }
        self._layers = decoder_layers(model)
        cache_module_list_slices(model)  # the decoder slices its layer list every step
        self._layer_ids = {id(m) for m in self._layers}
        self.owned_layers = [i for i, m in enumerate(self._layers) if id(m) in self._owned]
        self._phantoms = [i for i, m in enumerate(self._layers) if id(m) not in self._owned]
        self._phantom_set = set(self._phantoms)
        self.compiled: CompiledDecode | None = attach(
            index, self._layers, self.owned_layers, self.device, compile_decode, self.config
        )
        """The compiled decode step of the owned layers (opt-in; :mod:`.compiled_step`)."""
        self._structure: dict[type, int] = {}
        self._shadows: dict[Hashable, Any] = {}
        self.unit: str | None = None
        """The unit running now (a failure names it); None between units."""
        self._ctx: PassCtx | None = None
        self._payload: Payload | None = None
        """The payload the last pass started from (an ahead pass's came during the pass)."""
        self._call_map: dict[str, dict[int, int]] = {"encoder": {}, "decoder": {}}
        self._pass_name = "decoder"
        self._idle: set[str] = set()  # passes this stage takes no part in
        self._stop_after: dict[str, int] = {}
        """Per pass: the call of the owned unit whose output alone is what the call after it,
        where the stage stops, takes (learnt at a stop; then the stage stops right after that
        unit: not calling the next one saves ~50 us a step on the token's path)."""
        for k, mod in unit_mods.items():
            inner = mod.forward  # the class's, or compiled_step's (owned decoder layers)
            if k not in self._owned and self._has_meta[k]:
                runner = self._passthrough if k in self._layer_ids else self._shadow
                inner = bind(runner, mod)
            mod.forward = around(mod, inner, self._pre_hook, self._post_hook)
        self.groups: dict[int, GroupState] = {}
        self.timeline = Timeline()
        self.steps = 0
        self.ahead_steps = 0
        self.ahead_misses = 0
        """Decode steps run ahead of their message, and preparations another message undid."""
        self.busy_s = 0.0
        self.wait_s = 0.0
        self.send_s = 0.0
        """Steps run and seconds spent in them (compute + sampling), for utilization."""
        self.timing = StepTimes(step_timing)
        """Per-step breakdown (off unless ``step_timing``; see :mod:`.step_timing`)."""
        params = inspect.signature(model.forward).parameters
        self.accepts_position_ids = "position_ids" in params
        self.logits_to_keep = "logits_to_keep" in params
        # transformers 5.24 renamed ``past_key_values`` to ``cache`` (models and generate's
        # helpers alike); a cache under the other name would be silently ignored
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.decoder_start = decoder_start_id(model) if self.enc_dec else None
        self.rules = LogitsRules(model) if self.is_last else None
        self.prepares = self.is_first  # its decode steps' inputs, made ahead (decode_ahead)

    # ------------------------------------------------------------------ hooks

    def _pre_hook(self, mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        ctx = self._ctx
        if ctx is None:
            return None
        i = ctx.calls
        ctx.calls += 1
        self._call_map[self._pass_name][i] = id(mod)
        self.unit = self._names.get(id(mod))
        owned = id(mod) in self._owned
        if ctx.ahead is not None:
            if i == ctx.ahead_call:
                ctx.payload, ctx.ahead = ctx.ahead(), None  # blocks until the step's message
            elif owned:  # never run an owned unit on a step whose inputs have not come
                raise AheadMiss
        if owned and self.timing.on:
            self.timing.unit_start()
        if ctx.payload is not None and i == ctx.payload.call:
            if not owned:
                raise StageSkip
            ctx.entered = True
            args, kwargs = inject(mod, args, kwargs, ctx.payload.carry)
            for _, t in ctx.payload.carry:
                ctx.produced[id(t)] = t
            return args, kwargs
        if owned:
            if ctx.payload is None:
                ctx.entered = True
            return None
        if ctx.entered and self._has_meta.get(id(mod), False):
            carry = capture(mod, args, kwargs, ctx.produced)
            if ctx.last is not None and all(t is not ctx.last[1] for _, t in carry):
                # the last unit's output is not an argument of this call (GPT-2's ``wte``
                # before ``wpe``, BART's ``embed_tokens`` before ``embed_positions``): the
                # model combines them later, so the next stage needs it in place of its zeros
                carry = (*carry, (-1 - ctx.last[0], ctx.last[1]))
            elif (
                ctx.last is not None
                and ctx.last[0] == i - 1
                and len(carry) == 1
                and carry[0][0] == 1
                and carry[0][1] is ctx.last[1]
            ):  # only the last unit's output goes on: next time, stop right after that unit
                self._stop_after[self._pass_name] = i - 1
            raise StageExit(i, carry)
        return None

    def _post_hook(self, mod: nn.Module, args: tuple, out: Any) -> Any:
        ctx = self._ctx
        if ctx is None:
            return None
        self.unit = None
        if self.timing.on:
            self.timing.unit_end()
        call = ctx.calls - 1  # units do not nest: this is the call the pre-hook counted
        sent = ctx.outputs.get(call)
        if sent is not None and id(mod) not in self._owned:
            out = sent if isinstance(out, torch.Tensor) else (sent, *tuple(out)[1:])
        if ctx.entered:
            ts = out_tensors(out)
            for t in ts:
                ctx.produced[id(t)] = t
            if id(mod) in self._owned and ts:
                ctx.last = (call, ts[0])
                if self._stop_after.get(self._pass_name) == call:  # as the next call takes it
                    raise StageExit(call + 1, ((1, ts[0]),))
        return out if sent is not None else None

    # ------------------------------------------------------------------ passes

    def _run(
        self,
        name: str,
        payload: Payload | None,
        fn: Callable[[], Any],
        ahead: tuple[int, Callable[[], Payload]] | None = None,
    ) -> Any:
        """Run one pass; returns ``("exit", Payload)``, ``("done", output)`` or ``("skip",)``.
        ``ahead``: (call, fetch) of a pass run before its payload came (:meth:`decode_ahead`)."""
        if payload is not None:
            known = self._call_map[name].get(payload.call)
            if known is not None and known not in self._owned:
                return ("skip",)
        elif name in self._idle and ahead is None:
            return ("skip",)
        self._ctx = PassCtx(payload)
        if ahead is not None:
            self._ctx.ahead_call, self._ctx.ahead = ahead
        self._pass_name = name
        self.unit = None
        try:
            out = fn()
        except StageExit as e:
            return ("exit", Payload(e.call, e.carry))
        except StageSkip:
            return ("skip",)
        finally:
            ctx, self._ctx = self._ctx, None
            self._payload = ctx.payload  # an ahead pass's, once it came
        if not ctx.entered:  # owns nothing of this pass; a later stage starts it
            if payload is None:
                self._idle.add(name)
            return ("skip",)
        return ("done", out)

    def _model_inputs(
        self, ids: torch.Tensor, kwargs: dict[str, Any], prefill: bool
    ) -> dict[str, Any]:
        inputs = self.model.prepare_inputs_for_generation(
            ids, next_sequence_length=None if prefill else 1, is_first_iteration=prefill, **kwargs
        )
        inputs["return_dict"] = True
        return inputs

    @torch.no_grad()
    def prefill(
        self,
        gid: int,
        prompt: torch.Tensor,
        mask: torch.Tensor,
        payloads: list[Any],
        decoder_prefix: torch.Tensor | None = None,
    ) -> tuple[list[Any], torch.Tensor | None]:
        """Start group ``gid`` from padded ``prompt`` ids and their attention mask; an
        encoder-decoder's decoder starts from its start token followed by ``decoder_prefix``
        (``[rows, k]``: tokens generated before a replay), all of it prefilled at once."""
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        prompt, mask = prompt.to(self.device), mask.to(self.device)
        cfg = self.config.get_text_config(decoder=True)
        kw: dict[str, Any] = {"use_cache": True}
        if self.logits_to_keep:
            kw["logits_to_keep"] = 1
        if self.enc_dec:
            kw[self.cache_kw] = EncoderDecoderCache(
                grow_in_place(DynamicCache(config=cfg), self._phantoms), DynamicCache(config=cfg)
            )
            kw["attention_mask"] = mask
            ids = torch.full((prompt.shape[0], 1), self.decoder_start, dtype=torch.long)
            if decoder_prefix is not None:  # arrives on the stage's device (NCCL: a GPU)
                ids = torch.cat([ids, decoder_prefix.to(ids.device, torch.long)], dim=1)
            g = GroupState(ids.to(self.device), kw)
            enc = Payload.from_wire(payloads[0], self.device)
            if enc is not None and enc.call == Payload.DONE:
                enc_out = enc.carry[0][1]
            else:
                res = self._run(
                    "encoder",
                    enc,
                    lambda: self.model.get_encoder()(
                        input_ids=prompt, attention_mask=mask, return_dict=True
                    ),
                )
                if res[0] == "done":
                    enc_out = res[1].last_hidden_state
                    enc = Payload(Payload.DONE, ((0, enc_out),))
                else:  # "skip": this stage computes nothing of the encoder (T5's ``shared``
                    # alone is never called: the stacks call their own embed_tokens), so
                    # the pass goes on as it came, None if nobody started it yet
                    enc = res[1] if res[0] == "exit" else enc
                    enc_out = None
                payloads = [enc.to_wire() if enc is not None else None, payloads[1]]
            if enc_out is None:  # this stage runs no decoder layer before the encoder ends
                enc_out = torch.zeros(*prompt.shape[:2], cfg.hidden_size, device=self.device)
            kw["encoder_outputs"] = BaseModelOutput(last_hidden_state=enc_out)
        else:
            kw[self.cache_kw] = grow_in_place(DynamicCache(config=cfg), self._phantoms)
            kw["attention_mask"] = mask
            g = GroupState(prompt, kw)
            if self.accepts_position_ids:
                kw["position_ids"] = self.model._prepare_position_ids_for_generation(prompt, kw)
            if bool((mask == 1).all()):
                kw["attention_mask"] = None  # as generate does: no padding, no mask
        self.groups[gid] = g
        return self._decoder_pass(g, prefill=True, payloads=payloads)

    @torch.no_grad()
    def decode(
        self, gid: int, keep: torch.Tensor | None, tokens: torch.Tensor, payloads: list[Any]
    ) -> tuple[list[Any], torch.Tensor | None]:
        """One decode step of group ``gid``: keep rows ``keep`` (None: all), append ``tokens``."""
        g = self.groups[gid]
        inputs = g.take_prepared(keep, tokens)
        if inputs is not None:
            return self._decoder_pass(g, prefill=False, payloads=payloads, inputs=inputs)
        if keep is not None:
            self.select(gid, keep)
        g.ids, g.kwargs = self.grown(g, tokens)
        return self._decoder_pass(g, prefill=False, payloads=payloads)

    def grown(
        self, g: GroupState, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Group ``g``'s ids and model kwargs one decode step on, ``tokens`` appended (None: a
        zero placeholder, for a step made before its tokens come: :mod:`.decode_ahead`);
        ``g`` itself is left as it was."""
        kwargs = self.model._update_model_kwargs_for_generation(
            {}, dict(g.kwargs), is_encoder_decoder=self.enc_dec
        )
        new = g.ids.new_zeros(g.rows, 1) if tokens is None else tokens.to(self.device)
        return torch.cat([g.ids, new.view(-1, 1)], dim=-1), kwargs

    def can_decode_ahead(self, gid: int) -> bool:
        """Whether group ``gid``'s next decode step can be run ahead of its message
        (:mod:`.decode_ahead`): a later stage of a decoder-only model whose only group it is
        (with two the next message is as likely the other's), after one plain decode step told
        where steps come in (and they carry no earlier unit's output, see :class:`PassCtx`)."""
        g = self.groups.get(gid)
        return g is not None and g.ahead_call is not None and len(self.groups) == 1

    def _decoder_pass(
        self,
        g: GroupState,
        prefill: bool,
        payloads: list[Any],
        ahead: tuple[int, Callable[[], Payload]] | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> tuple[list[Any], torch.Tensor | None]:
        slot = len(payloads) - 1
        dec = Payload.from_wire(payloads[slot], self.device)
        self._settle(g)
        if inputs is None:
            inputs = self._model_inputs(g.ids, dict(g.kwargs), prefill)
        res = self._run("decoder", dec, lambda: self.model(**inputs), ahead)
        if ahead is not None:
            dec = self._payload
            if dec is None:  # the pass ended before the call: nothing came, nothing ran
                raise AheadMiss
        if not prefill and not self.is_first and not self.enc_dec:  # where the next comes in
            ok = dec is not None and all(p >= 0 for p, _ in dec.carry)
            g.ahead_call = dec.call if ok else None
        if self._phantoms:  # owed until the group is next used: off the token's path
            g.phantom_debt = int(g.ids.shape[1]) if prefill else 1
        logits = None
        if res[0] == "exit":
            payloads = [*payloads[:slot], res[1].to_wire()]
        elif res[0] == "done":
            if not self.is_last:
                raise PlanError(f"stage {self.index} finished the model but is not the last stage")
            logits = res[1].logits[:, -1, :].to(dtype=torch.float32)
        return payloads, logits

    # ------------------------------------------------------------------ cache bookkeeping

    def _self_cache(self, g: GroupState) -> Any:
        cache = g.kwargs[self.cache_kw]
        return getattr(cache, "self_attention_cache", cache)

    def _cache_len(self, g: GroupState) -> int | None:
        n = self._self_cache(g).get_seq_length()  # layer 0's (a phantom's may be owed)
        return n + g.phantom_debt if 0 in self._phantom_set else n

    def _settle(self, g: GroupState) -> None:
        """Move the phantom layers on by the tokens of the last pass (see _decoder_pass)."""
        if g.phantom_debt:
            cache = self._self_cache(g)
            advance_phantoms(cache, self._phantoms, g.rows, g.phantom_debt, self.device)
            g.phantom_debt = 0

    def select(self, gid: int, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` of group ``gid`` (finished or cancelled rows leave)."""
        g = self.groups[gid]
        self._settle(g)
        select_rows(g, keep.to(self.device), self.cache_kw)

    @property
    def can_merge(self) -> bool:
        """Groups can be merged (left-padding the shorter) unless a cache layer keeps only a
        sliding window (lengths would disagree) or the model is an encoder-decoder."""
        if self.enc_dec:
            return False
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config.get_text_config(decoder=True))
        return not any(getattr(layer, "is_sliding", False) for layer in cache.layers)

    def merge(self, dst: int, src: int) -> None:
        """Append group ``src``'s rows to group ``dst`` (continuous batching: a new request
        joins a running batch).  The shorter group is left-padded: ids with 0, attention mask
        and position ids with 0, cache entries with zeros that the mask hides."""
        a, b = self.groups[dst], self.groups.pop(src)
        for g in (a, b):
            self._settle(g)
        merge_groups(a, b, self._self_cache(a), self._self_cache(b))

    def release(self, gid: int) -> None:
        self.groups.pop(gid, None)

    def cache_stats(self) -> dict[str, int]:
        """Groups, sequences and cached tokens (rows x length, own layers) on this stage."""
        groups = list(self.groups.values())  # read from another thread (heartbeats, metrics)
        rows = sum(g.rows for g in groups)
        tokens = 0
        if self.owned_layers:
            tokens = sum(g.rows * (self._cache_len(g) or 0) for g in groups)
        nbytes = cache_bytes(groups, self.cache_kw, len(self._layers), self._phantom_set)
        return {
            "groups": len(groups),
            "sequences": rows,
            "tokens": tokens,
            "bytes": nbytes,
            "steps": self.steps,
            "busy_ms": int(self.busy_s * 1000),
            **self.timing.totals(),
        }
