"""Which models the generation stage runs: the families tested token-for-token, and the
check that refuses a model it cannot run, before any weight is read."""

from __future__ import annotations

from torch import nn

from .errors import UnsupportedModelError

__all__ = ["SUPPORTED_FAMILIES", "check_supported", "decoder_layers"]

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


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` (naming the supported families) for a model
    that cannot generate or keeps no standard per-layer KV cache."""
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


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder's layer list: cache layer ``i`` belongs to element ``i``."""
    config = model.config
    n = config.get_text_config(decoder=True).num_hidden_layers
    if getattr(config, "is_encoder_decoder", False):
        n = getattr(config, "num_decoder_layers", None) or n
    for _, m in model.get_decoder().named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return list(m)
    raise UnsupportedModelError(
        f"cannot find the decoder's {n} layers in {type(model).__name__}; "
        f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
    )
