"""A byte-level BPE tokenizer with a chat template, built offline (no hub download) for the
demo checkpoint of ``pipeserve local`` and for the tests: text in and out of a random-init
model, and chat requests through the OpenAI gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CHAT_TEMPLATE", "save_demo_tokenizer"]

SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
"""Ids 0, 1, 2 are Llama's default unk / BOS / EOS."""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Zephyr-style turns: ``<|role|>`` newline content ``</s>``; the answer follows
``<|assistant|>``."""

_WORDS_TEXT = (
    "the a an of to in on for with from by at as is are was were be been it this that these "
    "pipeline stage worker coordinator model token tokens cache layer layers request requests "
    "stream streams batch batches prompt answer question hello world server client gateway "
    "fast slow small large first last next every each one two three four five six seven eight "
    "nine ten red green blue cat dog bird tree river mountain city night day time people water "
    "light sound word words number numbers read write run runs send sends receive keep keeps "
    "make makes take takes give gives find finds think thinks know knows say says tell tells"
)
_WORDS = _WORDS_TEXT.split()


def _corpus(lines: int = 6000) -> list[str]:
    """Deterministic sentences over ``_WORDS`` and made-up words, with digits and
    punctuation: enough distinct pairs for a BPE of a thousand tokens or more."""
    import random

    rng = random.Random(0)
    made_up = ["".join(rng.choices("etaoinshrdlucmfwyp", k=rng.randint(3, 8))) for _ in range(600)]
    words = _WORDS + made_up
    out = []
    for i in range(lines):
        sentence = " ".join(rng.choices(words, k=rng.randint(3, 12)))
        out.append(sentence.capitalize() + rng.choice([". ", "? ", "! ", f" {i % 1000}. "]))
    return out


def save_demo_tokenizer(path: str | Path, vocab_size: int = 1000) -> Any:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (never more than the model's
    vocabulary) with BOS added to every encoding and :data:`CHAT_TEMPLATE`; save it into
    ``path`` (``tokenizer.json`` + config) and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast
