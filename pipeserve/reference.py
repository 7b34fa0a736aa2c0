"""The reference every pipelined generation must equal: single-process ``transformers``
``generate``, greedy.  ``pipeserve local``'s self-check and the tests both compare with it."""

from __future__ import annotations

from typing import Any

__all__ = ["hf_greedy"]


def hf_greedy(model: Any, prompt: list[int], new: int) -> list[int]:
    """The ``new`` tokens single-process ``transformers`` ``generate`` picks greedily for
    ``prompt`` (exactly ``new``: no end-of-sequence stop)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            eos_token_id=None,
            pad_token_id=0,
        )
    start = 1 if model.config.is_encoder_decoder else len(prompt)
    return out[0, start:].tolist()
