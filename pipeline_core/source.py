"""Where a model comes from, and how to build its skeleton without weights.

A :class:`ModelSource` names either a Hugging Face checkpoint directory (``config.json`` plus
weights) or a user factory ``"package.module:function"`` returning any ``nn.Module`` (its
weights still come from a checkpoint directory).  Both are plain data so a plan can be sent to
a worker on another host, which rebuilds the same skeleton.

[Note: meta parameters, real buffers]
The skeleton's parameters live on the ``meta`` device (no memory), but buffers stay real on the
CPU.  Non-persistent buffers (rotary ``inv_freq``, causal masks, ...) are not in checkpoints:
they are computed in ``__init__``, so keeping the constructed value is the only generic way to
get them right.  They are tiny next to the parameters.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, PlanError
from .load import CheckpointIndex

__all__ = [
    "InputSpec",
    "ModelSource",
    "build_skeleton",
    "check_inputs",
    "default_inputs",
    "meta_parameters",
    "parse_dtype",
    "resolve_dtype",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(source: ModelSource, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype a model runs in: ``dtype`` when given, else (None or ``"auto"``) the
    checkpoint's, as ``from_pretrained(dtype="auto")`` picks it: ``config.json``'s
    ``dtype`` / ``torch_dtype``, else the first floating tensor stored, else float32."""
    if dtype is not None and str(dtype) != "auto":
        return parse_dtype(dtype)
    if source.is_hf:
        named = getattr(hf_config(source.checkpoint), "dtype", None)
        if named is not None and str(named) != "auto":
            return parse_dtype(named)
    try:
        stored = CheckpointIndex.open(source.checkpoint).stored_dtype()
    except CheckpointError:
        stored = None  # no weights yet: planning still works, loading will say what is missing
    return stored or torch.float32


@dataclass(kw_only=True)
class InputSpec:
    """One model input, as used for tracing.

    ``dynamic`` maps a dimension index to a symbolic name; those dimensions may change per
    request without re-tracing (``{0: "batch", 1: "seq"}``).  Other dimensions are fixed.
    """

    name: str
    shape: list[int]
    dtype: str = "float32"
    dynamic: dict[int, str] = field(default_factory=dict)
    high: int | None = None
    """For integer inputs: exclusive upper bound of example values (e.g. the vocab size)."""
    max: dict[int, int] = field(default_factory=dict)
    """Largest size of a dynamic dimension, where the model has one (learned positions)."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["dynamic"] = {str(k): v for k, v in self.dynamic.items()}
        d["max"] = {str(k): v for k, v in self.max.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InputSpec:
        d = dict(d)
        d["dynamic"] = {int(k): v for k, v in d.get("dynamic", {}).items()}
        d["max"] = {int(k): v for k, v in d.get("max", {}).items()}
        return cls(**d)

    def check(self, value: Any) -> None:
        """Raise ValueError if ``value`` cannot be fed where this input was traced."""
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"input {self.name!r} must be a tensor, got {type(value).__name__}")
        want = parse_dtype(self.dtype)
        if value.dtype.is_floating_point != want.is_floating_point:
            raise ValueError(f"input {self.name!r} must be {self.dtype}-like, got {value.dtype}")
        if value.dim() != len(self.shape):
            raise ValueError(
                f"input {self.name!r} must have {len(self.shape)} dimensions "
                f"(like {self.shape}), got shape {list(value.shape)}"
            )
        for d, size in enumerate(value.shape):
            if d not in self.dynamic and size != self.shape[d]:
                raise ValueError(
                    f"input {self.name!r} dimension {d} must be {self.shape[d]} (fixed when "
                    f"traced), got {size}"
                )
            if d in self.max and size > self.max[d]:
                raise ValueError(
                    f"input {self.name!r} dimension {d} ({self.dynamic[d]}) is {size}; this "
                    f"model supports at most {self.max[d]}"
                )

    def example(self, device: torch.device | str = "cpu") -> torch.Tensor:
        dtype = parse_dtype(self.dtype)
        if dtype.is_floating_point:
            return torch.randn(self.shape, dtype=dtype, device=device)
        if dtype == torch.bool:
            return torch.ones(self.shape, dtype=dtype, device=device)
        return torch.randint(0, self.high or 2, self.shape, dtype=dtype, device=device)


def check_inputs(specs: list[InputSpec], inputs: dict[str, Any], required: list[str]) -> None:
    """Raise TypeError for a missing (one of ``required``) or unknown input, ValueError for one
    that cannot be fed where it was traced (:meth:`InputSpec.check`)."""
    names = [s.name for s in specs]
    missing = [n for n in required if n not in inputs]
    if missing:
        raise TypeError(f"missing inputs {missing}; the model takes {names}")
    unknown = [n for n in inputs if n not in names]
    if unknown:
        raise TypeError(f"unknown inputs {unknown}; the model takes {names}")
    for spec in specs:
        if spec.name in inputs:
            spec.check(inputs[spec.name])


@dataclass(kw_only=True)
class ModelSource:
    """Where the model's code and weights come from (plain data, JSON-serializable).

    ``checkpoint``: a directory with weights (and ``config.json`` for Hugging Face models).
    ``factory``: ``"package.module:function"`` returning an ``nn.Module``; when empty the
    model is a Hugging Face model described by ``checkpoint/config.json``.
    """

    checkpoint: str
    factory: str = ""

    @property
    def is_hf(self) -> bool:
        return not self.factory

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelSource:
        return cls(**d)


_INITS = tuple(n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_"))


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device; buffers stay real (see module note).

    A meta tensor has no values to initialise, so ``torch.nn.init`` functions return it
    untouched and transformers' own init skips it (on meta they run torch's Python reference
    kernels: most of the time of building a skeleton)."""
    original = nn.Module.register_parameter
    inits = {n: getattr(nn.init, n) for n in _INITS}

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        if param is not None:
            # transformers' init functions skip a tensor so marked: drawing random values
            # into meta tensors did nothing but took 3/4 of building a 70B skeleton (5.5 s)
            param._is_hf_initialized = True
        original(self, name, param)

    def skip_meta(fn: Any) -> Any:
        def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return tensor if tensor.is_meta else fn(tensor, *args, **kwargs)

        return init

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    for n, fn in inits.items():
        setattr(nn.init, n, skip_meta(fn))
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        for n, fn in inits.items():
            setattr(nn.init, n, fn)


def _load_factory(spec: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"factory {spec!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import model factory {spec!r}: {e}") from e
    return obj


def hf_config(checkpoint: str | Path) -> Any:
    from transformers import AutoConfig

    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}/config.json not found: a Hugging Face checkpoint directory needs it "
            "(or pass a model factory for a plain nn.Module)"
        )
    return AutoConfig.from_pretrained(path)


def _hf_model_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    try:
        transformers.AutoModelForCausalLM._model_mapping[type(config)]
        return transformers.AutoModelForCausalLM
    except (KeyError, ValueError):
        return transformers.AutoModel


def build_skeleton(
    source: ModelSource, dtype: torch.dtype | None = None, *, traceable: bool = True
) -> nn.Module:
    """The full model with meta parameters and real buffers, in eval mode.

    Floating-point parameters are cast to ``dtype`` when given (still on meta: free).  A Hugging
    Face model is built as ``from_pretrained`` builds it: under ``dtype`` as the default dtype
    (so what its ``__init__`` creates in the default dtype is in ``dtype``, and what it creates
    in float32 on purpose -- rotary ``inv_freq`` -- stays float32), with the parameters of its
    ``_keep_in_fp32_modules`` (float16) / ``_keep_in_fp32_modules_strict`` (float16, bfloat16)
    in float32.
    ``traceable``: mixture-of-experts layers use an implementation that runs on fake tensors
    and exports (see :func:`_traceable_experts`); False keeps the model's own, for eager stages.
    """
    # transformers builds under ``dtype`` as the default dtype (None: the config's)
    default = dtype if source.is_hf and dtype is not None and dtype.is_floating_point else None
    with meta_parameters():
        if source.is_hf:
            config = hf_config(source.checkpoint)
            cls = _hf_model_class(config)
            kw = {"dtype": default} if default is not None else {}
            if hasattr(cls, "from_config"):
                model = cls.from_config(config, **kw)
            else:
                model = cls._from_config(config, **kw)
        else:
            model = _load_factory(source.factory)()
            if not isinstance(model, nn.Module):
                raise ValueError(
                    f"factory {source.factory!r} returned {type(model)}, not nn.Module"
                )
    model.eval()
    if source.is_hf:
        _checkpoint_generation_config(model, source.checkpoint)
        _computed_parameters(model, dtype)
        if traceable:
            _traceable_experts(model)
    if dtype is not None:
        keep = _fp32_patterns(model, dtype) if source.is_hf else None
        cast: dict[int, nn.Parameter] = {}  # one cast per tensor: tied weights stay tied
        for mod_name, mod in model.named_modules():
            for name, p in list(mod._parameters.items()):
                if p is None or not p.is_floating_point():
                    continue
                want = dtype
                if keep is not None and keep.search(f"{mod_name}.{name}".lstrip(".")):
                    want = torch.float32
                elif default is not None:
                    want = p.dtype  # made under the default dtype: another is on purpose
                if p.dtype != want:
                    if id(p) not in cast:
                        cast[id(p)] = nn.Parameter(p.to(want), requires_grad=False)
                    mod._parameters[name] = cast[id(p)]
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _fp32_patterns(model: nn.Module, dtype: torch.dtype) -> re.Pattern[str] | None:
    """What ``from_pretrained`` keeps in float32 at ``dtype`` (its ``_get_dtype_plan``)."""
    names: set[str] = set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not names:
        return None
    return re.compile("|".join(n.replace("*", ".*") for n in sorted(names)))


def _checkpoint_generation_config(model: nn.Module, checkpoint: str | Path) -> None:
    """The checkpoint's ``generation_config.json`` (EOS ids, decoding rules), as
    ``from_pretrained`` reads it; ``from_config`` only derives one from ``config.json``."""
    path = Path(checkpoint) / "generation_config.json"
    if hasattr(model, "generation_config") and path.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(checkpoint)


def _traceable_experts(model: nn.Module) -> None:
    """Mixture-of-experts layers (Mixtral, Qwen-MoE, ...) default to ``grouped_mm``, whose
    fake-tensor kernel takes only bfloat16, so the planner's fake-tensor runs of another dtype
    fail.  They run ``batched_mm`` (the same math with static shapes); :func:`export_experts`
    switches back before ``torch.export``, under which ``grouped_mm`` takes transformers' own
    traceable fallback (``batched_mm`` would gather every token's expert weights)."""
    impl = getattr(model.config, "_experts_implementation", None)
    if impl == "grouped_mm" and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("batched_mm")
        model._pipeserve_experts = impl


def export_experts(model: nn.Module) -> None:
    """Undo :func:`_traceable_experts` (on ``model`` or a module holding it) before export."""
    for m in model.modules():
        impl = getattr(m, "_pipeserve_experts", None)
        if impl is not None:
            m.set_experts_implementation(impl)


def _computed_parameters(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Parameters the model never saves (``_keys_to_ignore_on_save``: Marian's sinusoidal
    position tables) are computed by its ``_init_weights``: do that now and keep them as
    non-persistent buffers, like other values a model computes when it is built.  One its
    ``_init_weights`` does not fill stays a meta parameter (a clear missing-tensor error)."""
    patterns = getattr(model, "_keys_to_ignore_on_save", None) or []
    for name, p in list(model.named_parameters()):
        if not p.is_meta or not p.is_floating_point():
            continue
        if not any(re.search(k, name) for k in patterns):
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        del mod._parameters[attr]
        mod.register_buffer(attr, torch.full(p.shape, torch.nan, dtype=p.dtype), persistent=False)
        with torch.no_grad():
            model._init_weights(mod)
        value = mod._buffers.pop(attr)
        if value is None or bool(value.isnan().any()):
            mod._parameters[attr] = p
            continue
        mod.register_buffer(attr, value if dtype is None else value.to(dtype), persistent=False)


def default_inputs(source: ModelSource, model: nn.Module | None = None) -> list[InputSpec]:
    """Example inputs for tracing a Hugging Face model, by its main input.

    Text models get ``input_ids`` + ``attention_mask`` (and ``decoder_input_ids`` for
    encoder-decoders) with dynamic batch and sequence; vision models get ``pixel_values``
    with a dynamic batch.  A factory model must bring its own (``inputs.json`` in the
    checkpoint directory, or pass them explicitly).
    """
    path = Path(source.checkpoint)
    if (path / "inputs.json").is_file():
        return [InputSpec.from_json(d) for d in json.loads((path / "inputs.json").read_text())]
    if not source.is_hf:
        raise PlanError(
            f"factory model {source.factory!r} needs example inputs: pass InputSpecs or write "
            f"{path}/inputs.json"
        )
    config = hf_config(path)
    main = getattr(model, "main_input_name", "input_ids") if model is not None else "input_ids"
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        ch = getattr(config, "num_channels", 3)
        return [
            InputSpec(name="pixel_values", shape=[2, ch, size, size], dynamic={0: "batch"}),
        ]
    if main != "input_ids" or _other_modalities(config):
        # audio (input_features, input_values), multimodal (CLIP: input_ids + pixel_values)...
        raise PlanError(
            f"no default example inputs for {getattr(config, 'model_type', path)!r} (main input "
            f"{main!r}): "
            "pass make_plan(..., inputs=[InputSpec(...), ...]) or write "
            f"{path}/inputs.json with every input the forward needs"
        )
    vocab = int(getattr(config, "vocab_size", 2))
    text = {0: "batch", 1: "seq"}
    # Learned position tables bound the sequence; export needs the bound stated.
    limit = _sequence_limit(config)
    seq_max = {1: limit} if limit is not None else {}
    specs = [
        InputSpec(
            name="input_ids", shape=[2, 8], dtype="int64", dynamic=text, high=vocab, max=seq_max
        ),
        InputSpec(
            name="attention_mask", shape=[2, 8], dtype="int64", dynamic=text, high=2, max=seq_max
        ),
    ]
    if getattr(config, "is_encoder_decoder", False):
        specs.append(
            InputSpec(
                name="decoder_input_ids",
                shape=[2, 5],
                dtype="int64",
                dynamic={0: "batch", 1: "dec_seq"},
                high=vocab,
            )
        )
    return specs


def _sequence_limit(config: Any) -> int | None:
    """The longest sequence a learned position table allows (None: no table, or tiny)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return int(limit) - 1 if isinstance(limit, int) and limit > 8 else None


def bound_sequences(config: Any, inputs: list[InputSpec]) -> list[InputSpec]:
    """Given inputs whose dynamic ``seq`` dimension states no bound get the position limit of
    the Hugging Face ``config``, as the default inputs have: planning runs long sequences on
    fake tensors, which a model with a short learned position table (CLIP's 77) refuses, and
    requests longer than the table are then refused up front with a clear error."""
    limit = _sequence_limit(config)
    if limit is None:
        return inputs
    out = []
    for s in inputs:
        seq = {d: limit for d, name in s.dynamic.items() if name == "seq" and d not in s.max}
        out.append(replace(s, max={**s.max, **seq}) if seq else s)
    return out


def _other_modalities(config: Any) -> bool:
    """A config with a vision or audio sub-config (CLIP, SigLIP, CLAP, ...): the model takes
    more than text."""
    return any(getattr(config, k, None) is not None for k in ("vision_config", "audio_config"))


def hf_tokenizer(checkpoint: str | Path) -> Any:
    """The checkpoint's tokenizer, or None when the directory has none (ids in/out only)."""
    path = Path(checkpoint)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
