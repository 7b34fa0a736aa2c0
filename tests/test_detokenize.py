"""Streamed text deltas add up to the whole decode, without re-decoding everything per token."""

from __future__ import annotations

import random

from pipeline_core.detokenize import Detokenizer

from .models import save_word_tokenizer


class ByteTokenizer:
    """Token i is byte i: a character of several UTF-8 bytes spans several tokens, as in
    byte-level BPE.  Counts the ids it decodes."""

    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_characters_are_held_back_until_complete():
    text = "naïve café — 東京 🚀 ok"
    ids = list(text.encode())
    tok = ByteTokenizer()
    detok = Detokenizer(tok)
    deltas = [detok.push([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert not any("\ufffd" in d for d in deltas)  # no half character was ever sent
    assert tok.decoded < 6 * len(ids)  # a window per step, not the whole text again


def test_cut_mid_character_flushes_what_is_there():
    ids = list("ab東".encode())[:-1]  # max_new_tokens stopped inside the character
    detok = Detokenizer(ByteTokenizer())
    streamed = "".join(detok.push([i]) for i in ids)
    assert streamed == "ab" and detok.flush() == "\ufffd"


def test_word_tokenizer_spacing_matches_full_decode(tmp_path):
    tok = save_word_tokenizer(tmp_path)
    rng = random.Random(0)
    ids = [rng.randrange(0, 90) for _ in range(40)]
    detok = Detokenizer(tok)
    out, i = [], 0
    while i < len(ids):  # chunks of 1-3 tokens, as a stream delivers them
        n = rng.randint(1, 3)
        out.append(detok.push(ids[i : i + n]))
        i += n
    assert "".join(out) + detok.flush() == tok.decode(ids, skip_special_tokens=True)
