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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .errors import CheckpointError, PlanError
from .kv_cache import grow_in_place
from .load import CheckpointIndex, ReadStats, read_tensors
from .logits_rules import LogitsRules
from .plan import Plan
from .source import build_skeleton, hf_checkpoint_keys, parse_dtype
from .timeline import Timeline

__all__ = ["SUPPORTED_FAMILIES", "GenStage", "GroupState", "StageExit", "UnsupportedModelError"]

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = (
    "gpt2",
    "opt",
    "bloom",
    "gpt_neo",
    "codegen",
    "llama",
    "t5",
    "mistral",
    "qwen2",
    "falcon",
    "gptj",
    "bart",
    "marian",
    "mbart",
    "pegasus",
    "mixtral",
)
"""Families tested token-for-token against ``transformers`` ``generate``; other causal-LM and
encoder-decoder families with a per-layer ``DynamicCache`` use the same runner."""


class UnsupportedModelError(PlanError):
    """The model cannot generate over the pipeline (says what is supported)."""


class StageExit(Exception):
    """Raised in a hook where this stage's part of a pass ends."""

    def __init__(self, call: int, carry: tuple[tuple[int, torch.Tensor], ...]) -> None:
        super().__init__(call)
        self.call = call
        self.carry = carry


class _Skip(Exception):
    """This stage owns nothing of the pass at the point where the previous stage stopped."""


@dataclass
class Payload:
    """What travels between stages for one pass.

    ``call`` is the index of the hooked unit call where the sender stopped (the receiver
    injects there); ``carry`` is (parameter position, tensor) for that call -- a negative
    position ``-1 - k`` instead carries the output of call ``k``, which the model combines
    later (GPT-2's token embeddings, computed before ``wpe``).  ``call == DONE``
    means the pass is complete and ``carry[0][1]`` is its output (the encoder output).
    """

    call: int
    carry: tuple[tuple[int, torch.Tensor], ...]

    DONE = -1

    def to_wire(self) -> tuple[Any, ...]:
        return (self.call, tuple(i for i, _ in self.carry), tuple(t for _, t in self.carry))

    @classmethod
    def from_wire(cls, v: Any, device: torch.device | None = None) -> Payload | None:
        if v is None:
            return None
        call, idx, tensors = v
        if device is not None:
            tensors = [t.to(device) for t in tensors]
        return cls(call, tuple(zip(idx, tensors, strict=True)))


@dataclass
class _PassCtx:
    payload: Payload | None
    calls: int = 0
    entered: bool = False
    produced: dict[int, torch.Tensor] = field(default_factory=dict)
    last: tuple[int, torch.Tensor] | None = None
    """(call, first output tensor) of the last unit this stage ran in this pass."""
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    """Outputs of earlier stages' units by call (a negative carry position, see _capture)."""

    def __post_init__(self) -> None:
        if self.payload is not None:
            self.outputs = {-1 - p: t for p, t in self.payload.carry if p < 0}


@dataclass
class GroupState:
    """One micro-batch of sequences (rows leave when done; other groups may merge in)."""

    ids: torch.Tensor
    """Decoder token ids so far, left-padded: ``[rows, length]``."""
    kwargs: dict[str, Any]
    """HF ``model_kwargs``: cache, attention_mask, position_ids, encoder outputs, ..."""
    sampling: Any = None
    """Last stage only: the rows' :class:`~pipeline_core.sampling.Sampler`."""

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])


def _unwrap(mod: nn.Module) -> Callable[..., Any]:
    return type(mod).forward


def _first_param(mod: nn.Module) -> inspect.Signature:
    return inspect.signature(_unwrap(mod))


class GenStage:
    """Stage ``index`` of ``plan`` built for KV-cached generation (see module docstring)."""

    def __init__(
        self,
        plan: Plan,
        index: int,
        device: torch.device | str = "cpu",
        *,
        stats: ReadStats | None = None,
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
        _check_supported(model)
        self.enc_dec = bool(getattr(self.config, "is_encoder_decoder", False))
        names = plan.stages[index].units
        unit_mods: dict[int, nn.Module] = {}
        self._names: dict[int, str] = {}
        for u in plan.units:
            m = model.get_submodule(u["name"])
            unit_mods.setdefault(id(m), m)
            self._names.setdefault(id(m), u["name"])
        self._owned = {id(model.get_submodule(n)) for n in names}
        self._load(names)
        self._has_meta: dict[int, bool] = {
            k: any(p.is_meta for p in m.parameters()) for k, m in unit_mods.items()
        }
        self._layers = self._find_layers()
        self._layer_ids = {id(m) for m in self._layers}
        self.owned_layers = [i for i, m in enumerate(self._layers) if id(m) in self._owned]
        self._phantoms = [i for i, m in enumerate(self._layers) if id(m) not in self._owned]
        self._phantom_set = set(self._phantoms)
        self._structure: dict[type, int] = {}
        self.unit: str | None = None
        """The unit running now (a failure names it); None between units."""
        self._ctx: _PassCtx | None = None
        self._call_map: dict[str, dict[int, int]] = {"encoder": {}, "decoder": {}}
        self._pass_name = "decoder"
        self._idle: set[str] = set()  # passes this stage takes no part in
        for k, mod in unit_mods.items():
            mod.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            mod.register_forward_hook(self._post_hook)
            if k not in self._owned and self._has_meta[k]:
                runner = self._passthrough if k in self._layer_ids else self._shadow
                mod.forward = _bind(runner, mod)
        self.groups: dict[int, GroupState] = {}
        self.timeline = Timeline()
        self.steps = 0
        self.busy_s = 0.0
        self.wait_s = 0.0
        self.send_s = 0.0
        """Steps run and seconds spent in them (compute + sampling), for utilization."""
        gen_cfg = getattr(model, "generation_config", None)
        params = inspect.signature(model.forward).parameters
        self.accepts_position_ids = "position_ids" in params
        self.logits_to_keep = "logits_to_keep" in params
        # transformers 5.24 renamed ``past_key_values`` to ``cache`` (models and generate's
        # helpers alike); a cache under the other name would be silently ignored
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.decoder_start = None
        if self.enc_dec:  # as generate: the generation config's, else the config's, else BOS
            for src, key in (
                (gen_cfg, "decoder_start_token_id"),
                (self.config, "decoder_start_token_id"),
                (gen_cfg, "bos_token_id"),
                (self.config, "bos_token_id"),
            ):
                if self.decoder_start is None:
                    self.decoder_start = getattr(src, key, None)
            if isinstance(self.decoder_start, list):
                self.decoder_start = self.decoder_start[0]
            if self.decoder_start is None:
                raise UnsupportedModelError(
                    "the encoder-decoder model has neither decoder_start_token_id nor "
                    "bos_token_id in its config or generation_config.json; set one"
                )
        self.rules = LogitsRules(model) if self.is_last else None

    # ------------------------------------------------------------------ building

    def _load(self, names: list[str]) -> None:
        model, plan, device = self.model, self.plan, self.device
        ckpt = CheckpointIndex.open(plan.source.checkpoint)
        hf_checkpoint_keys(model, ckpt)
        wanted: dict[str, tuple[str, list[int], torch.dtype]] = {}
        slots: dict[int, list[tuple[nn.Module, str]]] = {}  # tied: one read, every slot set
        first: dict[int, str] = {}
        for unit in names:
            for mod_name, mod in model.get_submodule(unit).named_modules(prefix=unit):
                for attr, p in mod._parameters.items():
                    if p is None:
                        continue
                    slots.setdefault(id(p), []).append((mod, attr))
                    if id(p) not in first:
                        pname = f"{mod_name}.{attr}"
                        first[id(p)] = pname
                        aliases = plan.tied.get(pname, [])
                        wanted[pname] = (ckpt.resolve(pname, aliases), list(p.shape), p.dtype)
        loaded = read_tensors(ckpt, wanted, device, self.stats)
        for pid, pname in first.items():
            param = nn.Parameter(loaded[pname], requires_grad=False)
            for mod, attr in slots[pid]:
                mod._parameters[attr] = param
        for mod in model.modules():
            for bname, b in list(mod._buffers.items()):
                if b is not None and not b.is_meta:
                    mod._buffers[bname] = b.to(device)
            for attr, val in list(vars(mod).items()):
                real = isinstance(val, torch.Tensor) and not val.is_meta
                if real and not isinstance(val, nn.Parameter):
                    setattr(mod, attr, val.to(device))
        for n in names:
            left = [pn for pn, p in self.model.get_submodule(n).named_parameters() if p.is_meta]
            if left:
                raise CheckpointError(f"stage {self.index}: {n} has tensors without values: {left}")

    def _find_layers(self) -> list[nn.Module]:
        """The decoder's layer list: cache layer ``i`` belongs to element ``i``."""
        decoder = self.model.get_decoder()
        n = self.config.get_text_config(decoder=True).num_hidden_layers
        if self.enc_dec:
            n = getattr(self.config, "num_decoder_layers", None) or n
        for _, m in decoder.named_modules():
            if isinstance(m, nn.ModuleList) and len(m) == n:
                return list(m)
        raise UnsupportedModelError(
            f"cannot find the decoder's {n} layers in {type(self.model).__name__}; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )

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
        if ctx.payload is not None and i == ctx.payload.call:
            if not owned:
                raise _Skip
            ctx.entered = True
            args, kwargs = _inject(mod, args, kwargs, ctx.payload.carry)
            for _, t in ctx.payload.carry:
                ctx.produced[id(t)] = t
            return args, kwargs
        if owned:
            if ctx.payload is None:
                ctx.entered = True
            return None
        if ctx.entered and self._has_meta.get(id(mod), False):
            carry = _capture(mod, args, kwargs, ctx.produced)
            if ctx.last is not None and all(t is not ctx.last[1] for _, t in carry):
                # the last unit's output is not an argument of this call (GPT-2's ``wte``
                # before ``wpe``, BART's ``embed_tokens`` before ``embed_positions``): the
                # model combines them later, so the next stage needs it in place of its zeros
                carry = (*carry, (-1 - ctx.last[0], ctx.last[1]))
            raise StageExit(i, carry)
        return None

    def _post_hook(self, mod: nn.Module, args: tuple, out: Any) -> Any:
        ctx = self._ctx
        if ctx is None:
            return None
        self.unit = None
        call = ctx.calls - 1  # units do not nest: this is the call the pre-hook counted
        sent = ctx.outputs.get(call)
        if sent is not None and id(mod) not in self._owned:
            out = sent if isinstance(out, torch.Tensor) else (sent, *tuple(out)[1:])
        if ctx.entered:
            ts = _tensors(out)
            for t in ts:
                ctx.produced[id(t)] = t
            if id(mod) in self._owned and ts:
                ctx.last = (call, ts[0])
        return out if sent is not None else None

    def _on_meta(self, mod: nn.Module, what: str, *args: Any, **kwargs: Any) -> Any:
        """``mod``'s own forward run on the meta device (inputs, and for the run its real buffers
        too: GPT-Neo's causal mask would otherwise meet meta activations); a failure is a clear
        error naming the unit, never a guess."""
        margs, mkwargs = tree_map(_to_meta, (args, kwargs))
        if "use_cache" in mkwargs:
            mkwargs["use_cache"] = False
        try:
            with _meta_buffers(mod), _meta_experts(self.model):
                return _unwrap(mod)(mod, *margs, **mkwargs)
        except Exception as e:
            name = self._names.get(id(mod), type(mod).__name__)
            raise UnsupportedModelError(
                f"stage {self.index}: cannot work out {what} of {name} "
                f"({type(mod).__name__}), which this stage skips: running it on the meta device "
                f"failed with {type(e).__name__}: {e}. Put {name} on a stage with its "
                f"neighbours (--split-at), or report the model"
            ) from e

    def _shadow(self, mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """A module this stage does not own: zeros shaped like its output (worked out on meta)."""
        out = self._on_meta(mod, "the output shape", *args, **kwargs)
        dev = self.device
        return tree_map(
            lambda t: (
                torch.zeros(t.shape, dtype=t.dtype, device=dev)
                if isinstance(t, torch.Tensor)
                else t
            ),
            out,
        )

    def _passthrough(self, mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """A layer this stage does not own: its input hidden states, in the layer's output
        structure (a tensor, or a tuple whose other entries are None), learnt once per layer
        class from a run on the meta device."""
        n = self._structure.get(type(mod))
        if n is None:
            out = self._on_meta(mod, "the output structure", *args, **kwargs)
            n = len(out) if isinstance(out, tuple) else 0
            self._structure[type(mod)] = n
        hidden = args[0] if args else next(iter(kwargs.values()))
        return hidden if n == 0 else (hidden, *([None] * (n - 1)))

    # ------------------------------------------------------------------ passes

    def _run(self, name: str, payload: Payload | None, fn: Callable[[], Any]) -> Any:
        """Run one pass; returns ``("exit", Payload)``, ``("done", output)`` or ``("skip",)``."""
        if payload is not None:
            known = self._call_map[name].get(payload.call)
            if known is not None and known not in self._owned:
                return ("skip",)
        elif name in self._idle:
            return ("skip",)
        self._ctx = _PassCtx(payload)
        self._pass_name = name
        self.unit = None
        try:
            out = fn()
        except StageExit as e:
            return ("exit", Payload(e.call, e.carry))
        except _Skip:
            return ("skip",)
        finally:
            ctx, self._ctx = self._ctx, None
        if not ctx.entered:  # owns nothing of this pass; a later stage starts it
            if payload is None:
                self._idle.add(name)
            return ("skip",)
        return ("done", out)

    def _model_inputs(self, g: GroupState, prefill: bool) -> dict[str, Any]:
        kw = dict(g.kwargs)
        inputs = self.model.prepare_inputs_for_generation(
            g.ids, next_sequence_length=None if prefill else 1, is_first_iteration=prefill, **kw
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
                grow_in_place(DynamicCache(config=cfg)), DynamicCache(config=cfg)
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
            kw[self.cache_kw] = grow_in_place(DynamicCache(config=cfg))
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
        if keep is not None:
            self.select(gid, keep)
        g.kwargs = self.model._update_model_kwargs_for_generation(
            {}, g.kwargs, is_encoder_decoder=self.enc_dec
        )
        g.ids = torch.cat([g.ids, tokens.to(self.device).view(-1, 1)], dim=-1)
        return self._decoder_pass(g, prefill=False, payloads=payloads)

    def _decoder_pass(
        self, g: GroupState, prefill: bool, payloads: list[Any]
    ) -> tuple[list[Any], torch.Tensor | None]:
        slot = len(payloads) - 1
        dec = Payload.from_wire(payloads[slot], self.device)
        inputs = self._model_inputs(g, prefill)
        res = self._run("decoder", dec, lambda: self.model(**inputs))
        self._advance_phantoms(g, int(g.ids.shape[1]) if prefill else 1)
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
        return self._self_cache(g).get_seq_length()

    def _advance_phantoms(self, g: GroupState, n: int) -> None:
        if n <= 0:
            return
        cache = self._self_cache(g)
        z = torch.zeros(g.rows, 1, n, 1, device=self.device)
        for i in self._phantoms:
            cache.update(z, z, i)

    def select(self, gid: int, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` of group ``gid`` (finished or cancelled rows leave)."""
        g = self.groups[gid]
        keep = keep.to(self.device)
        g.ids = g.ids[keep]
        g.kwargs[self.cache_kw].batch_select_indices(keep)
        for k in ("attention_mask", "position_ids"):
            v = g.kwargs.get(k)
            if isinstance(v, torch.Tensor) and v.shape[0] > 1:
                g.kwargs[k] = v[keep]
        enc = g.kwargs.get("encoder_outputs")
        if enc is not None:
            enc.last_hidden_state = enc.last_hidden_state[keep]
        if g.sampling is not None:
            g.sampling.select(keep.tolist())

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
        n = max(a.ids.shape[1], b.ids.shape[1])
        for key in ("attention_mask", "position_ids"):
            va, vb = a.kwargs.get(key), b.kwargs.get(key)
            if key == "position_ids" and va is None and vb is None:
                continue  # the model takes no position ids
            va, vb = _rows(va, a), _rows(vb, b)
            a.kwargs[key] = torch.cat([_lpad(va, n), _lpad(vb, n)])
        a.ids = torch.cat([_lpad(a.ids, n), _lpad(b.ids, n)])
        ca, cb = self._self_cache(a), self._self_cache(b)
        for la, lb in zip(ca.layers, cb.layers, strict=True):
            if not getattr(la, "is_initialized", False):
                continue
            m = max(la.keys.shape[-2], lb.keys.shape[-2])
            la.keys = torch.cat([_lpad(la.keys, m, -2), _lpad(lb.keys, m, -2)])
            la.values = torch.cat([_lpad(la.values, m, -2), _lpad(lb.values, m, -2)])
        if a.sampling is not None and b.sampling is not None:
            a.sampling.extend(b.sampling)

    def release(self, gid: int) -> None:
        self.groups.pop(gid, None)

    def cache_stats(self) -> dict[str, int]:
        """Groups, sequences and cached tokens (rows x length, own layers) on this stage."""
        groups = list(self.groups.values())  # read from another thread (heartbeats, metrics)
        rows = sum(g.rows for g in groups)
        tokens = 0
        if self.owned_layers:
            tokens = sum(g.rows * (self._cache_len(g) or 0) for g in groups)
        nbytes = 0
        for g in groups:
            for i, layer in enumerate(_cache_layers(g.kwargs[self.cache_kw])):
                if i % len(self._layers) in self._phantom_set:
                    continue
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor):
                        nbytes += t.numel() * t.element_size()
        return {
            "groups": len(groups),
            "sequences": rows,
            "tokens": tokens,
            "bytes": nbytes,
            "steps": self.steps,
            "busy_ms": int(self.busy_s * 1000),
        }


def _lpad(t: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
    """Left-pad ``t`` with zeros to length ``n`` along ``dim``."""
    dim = dim % t.dim()
    missing = n - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _rows(v: torch.Tensor | None, g: GroupState) -> torch.Tensor:
    """A group's attention mask / position ids with one row per sequence (None: no padding)."""
    if v is None:
        return torch.ones_like(g.ids)
    return v.expand(g.rows, -1) if v.shape[0] != g.rows else v


def _cache_layers(cache: Any) -> list[Any]:
    if hasattr(cache, "self_attention_cache"):
        return [*cache.self_attention_cache.layers, *cache.cross_attention_cache.layers]
    return list(cache.layers)


def _check_supported(model: nn.Module) -> None:
    cfg = model.config
    can = getattr(model, "can_generate", lambda: False)()
    if not can:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({cfg.model_type}) cannot generate: generation needs a "
            f"causal-LM or encoder-decoder LM; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )
    if hasattr(model, "_supports_default_dynamic_cache") and not (
        model._supports_default_dynamic_cache()
    ):
        raise UnsupportedModelError(
            f"{cfg.model_type} does not use a standard per-layer KV cache; supported "
            f"families: {', '.join(SUPPORTED_FAMILIES)}"
        )


def _bind(fn: Callable[..., Any], mod: nn.Module) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return fn(mod, *args, **kwargs)

    return forward


@contextmanager
def _meta_buffers(mod: nn.Module) -> Iterator[None]:
    """For the ``with`` block, every real buffer and plain tensor attribute under ``mod`` is a
    meta tensor of its shape (a skipped unit's code may combine them with its inputs)."""
    saved: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    for m in mod.modules():
        for table in (m._buffers, vars(m)):
            for k, v in list(table.items()):
                real = isinstance(v, torch.Tensor) and not v.is_meta
                if real and not isinstance(v, nn.Parameter):
                    saved.append((table, k, v))
                    table[k] = torch.empty_like(v, device="meta")
    try:
        yield
    finally:
        for table, k, v in saved:
            table[k] = v


@contextmanager
def _meta_experts(model: nn.Module) -> Iterator[None]:
    """Mixture-of-experts layers run ``batched_mm`` for the ``with`` block: ``grouped_mm``
    (their default) has no meta kernel for float32 (the planner's fake runs switch the same
    way, see :func:`~pipeline_core.source.build_skeleton`)."""
    impl = getattr(model.config, "_experts_implementation", None)
    if impl != "grouped_mm" or not hasattr(model, "set_experts_implementation"):
        yield
        return
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(impl)


def _to_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty_like(v, device="meta")
    if type(v).__name__.endswith("Cache"):
        return None
    return v


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        return [t for t in out if isinstance(t, torch.Tensor)]
    if hasattr(out, "to_tuple"):
        return [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]
    return []


def _capture(
    mod: nn.Module, args: tuple, kwargs: dict, produced: dict[int, torch.Tensor]
) -> tuple[tuple[int, torch.Tensor], ...]:
    """The arguments of this call that earlier units of the pass produced (always the first)."""
    sig = _first_param(mod)
    bound = sig.bind(mod, *args, **kwargs)
    names = list(sig.parameters)
    out = []
    for name, v in bound.arguments.items():
        pos = names.index(name)
        if isinstance(v, torch.Tensor) and (pos == 1 or id(v) in produced):
            out.append((pos, v))
    return tuple(out)


def _inject(
    mod: nn.Module, args: tuple, kwargs: dict, carry: tuple[tuple[int, torch.Tensor], ...]
) -> tuple[tuple, dict]:
    sig = _first_param(mod)
    bound = sig.bind(mod, *args, **kwargs)
    names = list(sig.parameters)
    for pos, t in carry:
        if pos >= 0:  # negative: an earlier unit's output (see _PassCtx.outputs)
            bound.arguments[names[pos]] = t
    return tuple(bound.args[1:]), dict(bound.kwargs)
