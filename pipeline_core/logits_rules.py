"""The model's own decoding rules, applied on the last stage as ``generate`` applies them.

A checkpoint's ``generation_config`` can carry rules that ``generate`` applies on every call
unless told otherwise: forced BOS/EOS tokens (BART, mBART, Marian, Pegasus), n-gram bans
(``no_repeat_ngram_size``), banned words (Marian bans its pad token), minimum lengths, suppressed
tokens (Whisper).  Each request gets the same rules through transformers' own processors, built
by ``generate``'s own builder, so they stay exactly ``generate``'s (order included).

Rules see a request's own tokens only (its prompt, or an encoder-decoder's decoder start, plus
what it generated), never the left padding of its micro-batch: a request decodes as if it ran
alone, whatever it shares a batch with.  The request's ``repetition_penalty`` joins them (in
``generate``'s place among them).  Sampling warpers (temperature, top-k, top-p) stay with the
request (:mod:`.sampling`).  Beam search (``num_beams > 1``) is not a rule: pipeserve decodes
one sequence per request.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["LogitsRules"]


class LogitsRules:
    """Builds one request's processors from the model's ``generation_config``."""

    def __init__(self, model: nn.Module) -> None:
        from transformers import GenerationConfig

        self.model = model
        base = copy.deepcopy(getattr(model, "generation_config", None)) or GenerationConfig()
        self.base = base
        base.do_sample = False  # the request's warpers are applied by the sampler
        base.num_beams = 1
        base.guidance_scale = None  # would run the model again, unconditionally
        base.repetition_penalty = 1.0
        self.model_rules = bool(self._processors(3, 1.0, 1, [0]))
        """Whether the model itself asks for any rule (else requests without a penalty skip
        processors altogether: plain argmax / sampling)."""

    def for_request(
        self,
        own_len: int,
        prompt_len: int,
        max_new_tokens: int,
        penalty: float,
        encoder_ids: list[int],
    ) -> Any | None:
        """Processors for a request whose history is ``own_len`` tokens at its first choice
        (``prompt_len`` of them its prompt; an encoder-decoder's encoder read
        ``encoder_ids``); None when there is nothing to apply."""
        if not self.model_rules and penalty == 1.0:
            return None
        # max_length as generate sets it: history + new tokens
        return self._processors(own_len + max_new_tokens, penalty, prompt_len, encoder_ids) or None

    def _processors(
        self, max_length: int, penalty: float, prompt_len: int, encoder_ids: list[int]
    ) -> Any:
        gc = copy.deepcopy(self.base)
        gc.repetition_penalty = penalty
        gc.max_length = max_length
        gc.max_new_tokens = None
        self.model._prepare_special_tokens(gc, True, device=torch.device("cpu"), batch_size=1)
        return self.model._get_logits_processor(
            gc,
            input_ids_seq_length=prompt_len,
            encoder_input_ids=torch.tensor([encoder_ids]),  # for the encoder-side rules
            device=torch.device("cpu"),
        )
