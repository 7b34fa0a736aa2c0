"""The model's special token ids, from its generation config and config, as ``generate``
picks them: EOS, padding, and an encoder-decoder's decoder start."""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedModelError

__all__ = ["decoder_start_id", "eos_and_pad"]


def eos_and_pad(model: Any) -> tuple[set[int], int]:
    """The ids that end a sequence, and the id that pads a prompt: the generation config's,
    else the text config's; the pad falls back to the smallest EOS (it is masked out anyway)."""
    text = model.config.get_text_config(decoder=True)
    vocab = int(text.vocab_size)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(text, "eos_token_id", None)
    eos_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = getattr(text, "pad_token_id", None)
    if pad is None:
        pad = min(eos_ids, default=0)
    return eos_ids, int(pad) if 0 <= int(pad) < vocab else 0


def decoder_start_id(model: Any) -> int:
    """The token an encoder-decoder's decoder starts from, as ``generate`` picks it: the
    generation config's ``decoder_start_token_id``, else the config's, else BOS."""
    gen_cfg = getattr(model, "generation_config", None)
    start = None
    for src, key in (
        (gen_cfg, "decoder_start_token_id"),
        (model.config, "decoder_start_token_id"),
        (gen_cfg, "bos_token_id"),
        (model.config, "bos_token_id"),
    ):
        if start is None:
            start = getattr(src, key, None)
    if isinstance(start, list):
        start = start[0]
    if start is None:
        raise UnsupportedModelError(
            "the encoder-decoder model has neither decoder_start_token_id nor "
            "bos_token_id in its config or generation_config.json; set one"
        )
    return int(start)
