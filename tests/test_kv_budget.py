"""The scheduler's KV budget: reserve, grow, release, refuse."""

from __future__ import annotations

import pytest

from pipeline_core.errors import ResourceExhausted
from pipeline_core.kv_budget import KVBudget


def test_reserve_and_release():
    b = KVBudget(max_tokens=100, max_sequences=3)
    b.reserve(60, 2)
    assert (b.used_tokens, b.used_rows) == (60, 2)
    assert b.fits(40, 1) and not b.fits(41) and not b.fits(0, 2)
    b.release(30, 1)
    assert (b.used_tokens, b.used_rows) == (30, 1)
    b.reserve(70, 2)
    assert (b.used_tokens, b.used_rows) == (100, 3)


def test_refuses_what_does_not_fit_and_keeps_its_state():
    b = KVBudget(max_tokens=100, max_sequences=2)
    b.reserve(90, 1)
    with pytest.raises(ResourceExhausted, match="90 of 100 tokens"):
        b.reserve(11, 1)
    with pytest.raises(ResourceExhausted, match="1 of 2 rows"):
        b.reserve(1, 2)
    assert (b.used_tokens, b.used_rows) == (90, 1)


def test_a_request_that_can_never_fit():
    b = KVBudget(max_tokens=100, max_sequences=2)
    b.check_request(100)
    with pytest.raises(ResourceExhausted, match=r"needs 101 KV tokens .* budget is 100"):
        b.check_request(101)


def test_merge_padding_grows_then_is_released_with_the_rows():
    b = KVBudget(max_tokens=100, max_sequences=4)
    b.reserve(50, 2)
    b.grow(8)  # left padding of the shorter group's rows
    assert b.used_tokens == 58 and b.used_rows == 2
    b.release(58, 2)
    assert (b.used_tokens, b.used_rows) == (0, 0)


def test_release_more_than_reserved_is_a_bug():
    b = KVBudget(max_tokens=10, max_sequences=1)
    b.reserve(5, 1)
    with pytest.raises(RuntimeError, match="only 5 / 1 are reserved"):
        b.release(6, 1)


def test_clear_and_bad_limits():
    b = KVBudget(max_tokens=10, max_sequences=1)
    b.reserve(10, 1)
    b.clear()
    assert b.fits(10, 1)
    with pytest.raises(ValueError, match="max_tokens > 0"):
        KVBudget(0, 1)
