"""The generation ring's message codec: every kind round-trips, as the wire would carry it."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline_core.errors import TransportError
from pipeline_core.ring_messages import (
    Decode,
    Fail,
    Merge,
    Ping,
    Prefill,
    Release,
    Stats,
    Stop,
    Tokens,
    decode,
    encode,
)
from pipeline_core.sampling import (
    FLOAT_COLUMNS,
    INT_COLUMNS,
    SamplingParams,
    decode_rows,
    encode_rows,
)
from pipeline_core.transport import StageFailure, _Fail, _Slot, decode_header, encode_header


def _over_wire(values: list) -> list:
    """``values`` through the transport's header codec, each tensor copied as its bytes would
    arrive (what a :class:`~pipeline_core.transport.Channel` receives, without a process group):
    lists come back as tuples, a failure as a :class:`StageFailure`."""
    header, sent = encode_header(values)
    got, specs = decode_header(header)
    it = iter(sent)  # tensors with no elements are not sent
    received = [
        next(it).clone() if math.prod(shape) else torch.empty(shape, dtype=dtype)
        for dtype, shape in specs
    ]
    assert next(it, None) is None

    def fill(v):
        if isinstance(v, _Slot):
            return received[v.i]
        if isinstance(v, _Fail):
            return StageFailure(bytes(fill(v.inner).tolist()).decode())
        if isinstance(v, tuple):
            return tuple(fill(x) for x in v)
        return v

    return [fill(v) for v in got]


def _equal(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, tuple):
        return isinstance(y, tuple) and len(x) == len(y) and all(map(_equal, x, y))
    return x == y


def _same(a, b) -> None:
    assert type(a) is type(b)
    for name in a.__slots__:
        assert _equal(getattr(a, name), getattr(b, name)), name


def _messages():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    floats, ints = encode_rows([SamplingParams(), SamplingParams(temperature=0.7)], [1, 2**64 - 1])
    payload = (3, (1, -2), (torch.randn(2, 3, 4), torch.randn(2, 4)))
    return [
        Prefill(4, ids, (ids > 0).long(), floats, ints, None, (None,)),
        Prefill(5, ids, (ids > 0).long(), floats, ints, torch.tensor([[1], [2]]), (None, payload)),
        Decode(4, None, torch.tensor([3, 4]), (payload,)),
        Decode(4, torch.tensor([1]), torch.tensor([3]), (None,)),
        Tokens(4, torch.tensor([11, 12])),
        Fail(4, "stage 1, unit model.layers.0: RuntimeError: boom"),
        Release(4),
        Merge(4, 5),
        Stats(),
        Stats(((1, 2, 3, 4, 5, 6), (0, 0, 0, 0, 1, 2))),
        Ping(),
        Stop(),
    ]


@pytest.mark.parametrize("msg", _messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    _same(decode(encode(msg)), msg)  # in one process (the in-process ring)
    _same(decode(_over_wire(encode(msg))), msg)  # through the transport's codec


def test_every_kind_has_a_distinct_op():
    ops = {type(m): encode(m)[0] for m in _messages()}
    assert len(set(ops.values())) == len(ops) == 9


def test_bad_wire_values_are_a_clear_error():
    with pytest.raises(TransportError, match="unknown ring message kind 42"):
        decode([42, 1])
    with pytest.raises(TransportError, match="unknown ring message kind 'nothing'"):
        decode([])
    with pytest.raises(TransportError, match="Merge has 1 fields, expected 2"):
        decode([encode(Merge(1, 2))[0], 1])
    with pytest.raises(TypeError, match="not a ring message"):
        encode([1, 2])  # type: ignore[arg-type]


def test_sampling_columns_round_trip_by_name():
    params = [
        SamplingParams(temperature=0.5, top_p=0.9, top_k=7, repetition_penalty=1.2),
        SamplingParams(max_new_tokens=9, step_offset=3),
    ]
    seeds = [2**64 - 1, 5]  # a uint64 seed travels as the int64 of the same bits
    floats, ints = encode_rows(params, seeds)
    assert floats.shape == (2, len(FLOAT_COLUMNS)) and floats.dtype == torch.float64
    assert ints.shape == (2, len(INT_COLUMNS)) and ints.dtype == torch.int64
    cols = decode_rows(floats, ints)
    assert cols["seed"] == seeds
    for name in (*FLOAT_COLUMNS, *INT_COLUMNS):
        if name != "seed":
            assert cols[name] == [getattr(p, name) for p in params], name
