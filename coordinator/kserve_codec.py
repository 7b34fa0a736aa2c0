"""KServe v2 infer requests read into pipeserve.v1 requests, exactly: a tensor's shape x
datatype must match its data, a batch of rows is refused (one sequence per request), a BYTES
element's length prefix must fit, parameters must be numbers that fit -- anything else is a
``ValueError`` that names what was wrong (INVALID_ARGUMENT).

It reads the request messages by field only and never imports the KServe protos, so tests can
build requests with tritonclient's own (the same wire format; both in one process clash in
protobuf's descriptor pool).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from pipeline_core import SamplingParams
from pipeserve import rpc
from pipeserve.v1 import pipeserve_pb2 as pb

__all__ = ["KSERVE_DTYPES", "TORCH_NAMES", "encode_bytes", "to_forward", "to_generate"]


KSERVE_DTYPES = {
    "FP32": "float32",
    "FP64": "float64",
    "FP16": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "INT16": "int16",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}
TORCH_NAMES = {v: k for k, v in KSERVE_DTYPES.items()}
_CONTENTS = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "INT16": "int_contents",
    "INT8": "int_contents",
    "UINT8": "uint_contents",
    "BOOL": "bool_contents",
}


_NUMPY = {"INT64": "<i8", "INT32": "<i4"}


def _shape(t: Any) -> list[int]:
    shape = list(t.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"input {rpc.clip(t.name)}: shape {shape[:8]} has a negative dimension")
    return shape


def _inputs(req: Any) -> list[tuple[Any, bytes | None]]:
    """Each input with its raw bytes (None: it uses ``contents``); KServe sends either every
    input raw or none."""
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise ValueError(
            f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs; send one per input "
            "or use contents"
        )
    names = [t.name for t in req.inputs]
    if len(set(names)) != len(names):
        raise ValueError("an input name appears twice")
    return [(t, raw[i] if raw else None) for i, t in enumerate(req.inputs)]


def _fixed(t: Any, raw: bytes | None, dtype: str) -> bytes:
    """The little-endian bytes of a fixed-size input; its shape x datatype must match the data
    exactly (raises ValueError)."""
    n = math.prod(_shape(t))
    item = np.dtype(dtype).itemsize
    if raw is None:
        field = _CONTENTS.get(t.datatype)
        if field is None:
            raise ValueError(f"input {rpc.clip(t.name)}: send {t.datatype} as raw_input_contents")
        values = list(getattr(t.contents, field))
        if len(values) != n:
            raise ValueError(
                f"input {rpc.clip(t.name)}: shape {list(t.shape)} has {n} elements but "
                f"contents hold {len(values)}"
            )
        try:
            return np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
        except OverflowError as e:
            raise ValueError(f"input {rpc.clip(t.name)}: a value does not fit {dtype}") from e
    if len(raw) != n * item:
        raise ValueError(
            f"input {rpc.clip(t.name)}: shape {list(t.shape)} of {t.datatype} is {n * item} "
            f"bytes but {len(raw)} were sent"
        )
    return raw


def to_forward(req: Any) -> pb.ForwardRequest:
    """A ``pipeserve.v1.ForwardRequest`` from a v2 infer request (raises ValueError)."""
    out = pb.ForwardRequest(model=req.model_name)
    for t, raw in _inputs(req):
        if t.datatype not in KSERVE_DTYPES:
            raise ValueError(
                f"input {rpc.clip(t.name)}: datatype {rpc.clip(t.datatype)} is not supported"
            )
        dtype = KSERVE_DTYPES[t.datatype]
        data = _fixed(t, raw, "<f2" if dtype == "bfloat16" else dtype)
        out.inputs.add(name=t.name, dtype=dtype, shape=list(t.shape), data=data)
    return out


def _param(p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """KServe's BYTES encoding (each element: a little-endian uint32 length, then the bytes);
    every length must fit and nothing may be left over (raises ValueError)."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ValueError(f"input {rpc.clip(name)}: a truncated BYTES length prefix")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise ValueError(
                f"input {rpc.clip(name)}: a BYTES element of {n} bytes runs past the "
                f"{len(raw)} bytes sent"
            )
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _text(t: Any, raw: bytes | None) -> str:
    if t.datatype != "BYTES":
        raise ValueError(f"text_input must be BYTES, not {rpc.clip(t.datatype)}")
    items = _bytes_elements(raw, t.name) if raw is not None else list(t.contents.bytes_contents)
    n = math.prod(_shape(t))
    if n != 1 or len(items) != 1:
        raise ValueError(
            f"text_input must hold exactly one string (shape [1]); shape {list(t.shape)[:8]} "
            f"with {len(items)} sent: send one request per text"
        )
    return items[0].decode()


def _ids(t: Any, raw: bytes | None) -> list[int]:
    if t.datatype not in _NUMPY:
        raise ValueError(f"input_ids must be INT64 or INT32, not {rpc.clip(t.datatype)}")
    shape = _shape(t)
    if len(shape) == 2 and shape[0] != 1:
        raise ValueError(
            f"input_ids of shape {shape} is a batch of {shape[0]} sequences; send one "
            "sequence per request (shape [1, n] or [n]) -- requests run concurrently"
        )
    if len(shape) not in (1, 2):
        raise ValueError(f"input_ids must have shape [1, n] or [n], not {shape[:8]}")
    data = _fixed(t, raw, _NUMPY[t.datatype])
    return [int(x) for x in np.frombuffer(data, dtype=_NUMPY[t.datatype])]


def _number(params: dict[str, Any], names: tuple[str, ...], kind: type, default: Any) -> Any:
    for name in names:
        if name in params:
            value = params.pop(name)
            try:
                return kind(value)
            except (TypeError, ValueError, OverflowError) as e:
                raise ValueError(
                    f"parameter {name}: {rpc.clip(str(value))} is not a {kind.__name__}"
                ) from e
    return default


def to_generate(req: Any) -> tuple[pb.GenerateRequest, bool]:
    """A ``pipeserve.v1.GenerateRequest`` from a v2 infer request, and whether the outputs
    carry a batch dimension of 1 (as ``input_ids`` did); raises ValueError."""
    out = pb.GenerateRequest(model=req.model_name)
    batched = False
    for t, raw in _inputs(req):
        if t.name == "text_input":
            out.text = _text(t, raw)
        elif t.name == "input_ids":
            out.token_ids.ids.extend(_ids(t, raw))
            batched = len(t.shape) == 2
        else:
            raise ValueError(f"unknown input {rpc.clip(t.name)}; use text_input or input_ids")
    if not out.HasField("text") and not out.HasField("token_ids"):
        raise ValueError("give an input text_input (BYTES) or input_ids (INT64)")
    if out.HasField("text") and out.token_ids.ids:
        raise ValueError("give text_input or input_ids, not both")
    params = {k: _param(v) for k, v in req.parameters.items()}
    try:
        out.max_new_tokens = _number(
            params, ("max_tokens", "max_new_tokens"), int, SamplingParams().max_new_tokens
        )
        s = out.sampling
        s.temperature = _number(params, ("temperature",), float, 0.0)
        s.top_k = _number(params, ("top_k",), int, 0)
        s.top_p = _number(params, ("top_p",), float, 1.0)
        s.repetition_penalty = _number(params, ("repetition_penalty",), float, 1.0)
        s.ignore_eos = bool(params.pop("ignore_eos", False))
        if "seed" in params:
            s.seed = _number(params, ("seed",), int, 0)
    except ValueError as e:  # the proto's own range checks (int32, uint64) included
        raise ValueError(f"parameters: {e}") from e
    params.pop("triton_enable_empty_final_response", None)
    if params:
        raise ValueError(f"unknown parameters {rpc.clip(str(sorted(params)))}")
    return out, batched
