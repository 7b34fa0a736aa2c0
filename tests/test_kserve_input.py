"""KServe v2 requests are read exactly: a tensor's shape x datatype must match its data, a
batch of rows is refused (one sequence per request), BYTES length prefixes must fit, odd
parameters are INVALID_ARGUMENT material (ValueError), never a crash."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from coordinator.kserve_codec import to_forward, to_generate

# requests built with tritonclient's messages (the same wire format): pipeserve's own KServe
# protos would clash with tritonclient's in this process's protobuf pool
kv2 = pytest.importorskip("tritonclient.grpc.service_pb2")


def _ids(shape: list[int], values: list[int], dtype: str = "INT64", raw: bool = True):
    req = kv2.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="input_ids", datatype=dtype, shape=shape)
    if raw:
        req.raw_input_contents.append(
            np.asarray(values, dtype="<i8" if dtype == "INT64" else "<i4").tobytes()
        )
    elif dtype == "INT64":
        t.contents.int64_contents.extend(values)
    else:
        t.contents.int_contents.extend(values)
    return req


def _text(raw: bytes, shape: list[int] | None = None):
    req = kv2.ModelInferRequest(model_name="m")
    req.inputs.add(name="text_input", datatype="BYTES", shape=shape or [1])
    req.raw_input_contents.append(raw)
    return req


def test_input_ids_shapes():
    gen, batched = to_generate(_ids([1, 3], [5, 6, 7]))
    assert list(gen.token_ids.ids) == [5, 6, 7] and batched
    gen, batched = to_generate(_ids([3], [5, 6, 7], "INT32", raw=False))
    assert list(gen.token_ids.ids) == [5, 6, 7] and not batched
    bad = [
        (_ids([2, 3], list(range(6))), "batch of 2"),  # rows are refused, not merged
        (_ids([2**40], [1, 2, 3]), "bytes"),  # shape x dtype must match the data
        (_ids([4], [1, 2, 3], raw=False), "elements"),
        (_ids([3], [1, 2, 3, 4]), "bytes"),
        (_ids([-1, -3], [1, 2, 3]), "negative"),
        (_ids([1, 1, 3], [1, 2, 3]), "shape"),
        (_ids([3], [1, 2, 3], "FP32"), "INT64 or INT32"),
    ]
    for req, match in bad:
        with pytest.raises(ValueError, match=match):
            to_generate(req)


def test_bytes_prefix_must_fit():
    ok = struct.pack("<I", 5) + b"hello"
    assert to_generate(_text(ok))[0].text == "hello"
    for raw, match in [
        (struct.pack("<I", 2**31) + b"abc", "runs past"),
        (ok + b"\x01\x00", "truncated"),
        (ok + ok, "exactly one string"),
        (struct.pack("<I", 2) + b"\xff\xfe", "utf-8"),
    ]:
        with pytest.raises(ValueError, match=match):
            to_generate(_text(raw))
    with pytest.raises(ValueError, match="exactly one string"):
        to_generate(_text(ok, shape=[2]))


def test_parameters_and_mixing():
    req = _ids([3], [1, 2, 3])
    req.parameters["max_tokens"].double_param = float("inf")
    with pytest.raises(ValueError, match="max_tokens"):
        to_generate(req)
    req = _ids([3], [1, 2, 3])
    req.parameters["top_k"].int64_param = 2**40  # past the proto's int32
    with pytest.raises(ValueError, match="parameters"):
        to_generate(req)
    req = _ids([3], [1, 2, 3])
    req.parameters["seed"].int64_param = -1
    with pytest.raises(ValueError, match="parameters"):
        to_generate(req)
    req = _ids([3], [1, 2, 3])
    req.inputs.add(name="input_ids", datatype="INT64", shape=[1])
    with pytest.raises(ValueError, match=r"raw_input_contents|twice"):
        to_generate(req)


def test_forward_tensors_exact():
    req = kv2.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    req.raw_input_contents.append(np.ones(4, dtype="<f4").tobytes())
    assert to_forward(req).inputs[0].shape == [2, 2]
    req.raw_input_contents[0] = np.ones(3, dtype="<f4").tobytes()
    with pytest.raises(ValueError, match="bytes"):
        to_forward(req)
    req = kv2.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="x", datatype="FP32", shape=[2**40])
    t.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(ValueError, match="elements"):
        to_forward(req)
