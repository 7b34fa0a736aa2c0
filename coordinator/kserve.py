"""KServe / Triton Open Inference Protocol v2 (``inference.GRPCInferenceService``) on the
coordinator, so ``tritonclient`` and KServe clients work unchanged.

A generation model takes ``text_input`` (BYTES) or ``input_ids`` (INT32/INT64) and the
parameters ``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
``repetition_penalty``, ``ignore_eos``; it returns ``output_ids`` (INT64) and, with a
tokenizer, ``text_output`` (BYTES).  ``ModelStreamInfer`` answers one response per new token
(Triton's decoupled style, the last flagged ``triton_final_response``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from pipeserve import rpc
from pipeserve.inference import grpc_predict_v2_pb2 as kv2
from pipeserve.inference import grpc_predict_v2_pb2_grpc as kg
from pipeserve.v1 import pipeserve_pb2 as pb

from .server import CallError, Coordinator

__all__ = ["KServeServicer"]

VERSION = "0.1.0"


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


def to_forward(req: kv2.ModelInferRequest) -> pb.ForwardRequest:
    """A ``pipeserve.v1.ForwardRequest`` from a v2 infer request (raises ValueError)."""
    out = pb.ForwardRequest(model=req.model_name)
    for i, t in enumerate(req.inputs):
        if t.datatype not in KSERVE_DTYPES:
            raise ValueError(
                f"input {rpc.clip(t.name)}: datatype {rpc.clip(t.datatype)} is not supported"
            )
        dtype = KSERVE_DTYPES[t.datatype]
        if i < len(req.raw_input_contents):
            data = req.raw_input_contents[i]
        else:
            field = _CONTENTS.get(t.datatype)
            if field is None:
                raise ValueError(
                    f"input {rpc.clip(t.name)}: send {t.datatype} as raw_input_contents"
                )
            values = list(getattr(t.contents, field))
            data = np.asarray(values, dtype=np.dtype(dtype)).tobytes()
        out.inputs.add(name=t.name, dtype=dtype, shape=list(t.shape), data=data)
    return out


def from_forward(req: kv2.ModelInferRequest, res: pb.ForwardResponse) -> kv2.ModelInferResponse:
    r = kv2.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
    for t in res.outputs:
        r.outputs.add(name=t.name, datatype=TORCH_NAMES[t.dtype], shape=list(t.shape))
        r.raw_output_contents.append(t.data)
    return r


def _param(p: kv2.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _bytes_elements(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i + 4 <= len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def _encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def to_generate(req: kv2.ModelInferRequest) -> pb.GenerateRequest:
    """A ``pipeserve.v1.GenerateRequest`` from a v2 infer request (raises ValueError)."""
    out = pb.GenerateRequest(model=req.model_name)
    for i, t in enumerate(req.inputs):
        raw = req.raw_input_contents[i] if i < len(req.raw_input_contents) else None
        if t.name == "text_input":
            items = _bytes_elements(raw) if raw is not None else list(t.contents.bytes_contents)
            if len(items) != 1:
                raise ValueError("text_input must hold exactly one string")
            out.text = items[0].decode()
        elif t.name == "input_ids":
            if t.datatype not in ("INT64", "INT32"):
                raise ValueError(f"input_ids must be INT64 or INT32, not {t.datatype}")
            if raw is not None:
                ids = np.frombuffer(raw, dtype="<i8" if t.datatype == "INT64" else "<i4")
            else:
                ids = np.array(list(t.contents.int64_contents) or list(t.contents.int_contents))
            out.token_ids.ids.extend(int(x) for x in ids.reshape(-1))
        else:
            raise ValueError(f"unknown input {rpc.clip(t.name)}; use text_input or input_ids")
    if not out.HasField("text") and not out.HasField("token_ids"):
        raise ValueError("give an input text_input (BYTES) or input_ids (INT64)")
    params = {k: _param(v) for k, v in req.parameters.items()}
    out.max_new_tokens = int(params.pop("max_tokens", params.pop("max_new_tokens", 32)))
    s = out.sampling
    s.temperature = float(params.pop("temperature", 0.0))
    s.top_k = int(params.pop("top_k", 0))
    s.top_p = float(params.pop("top_p", 1.0))
    s.repetition_penalty = float(params.pop("repetition_penalty", 1.0))
    s.ignore_eos = bool(params.pop("ignore_eos", False))
    if "seed" in params:
        s.seed = int(params.pop("seed"))
    params.pop("triton_enable_empty_final_response", None)
    if params:
        raise ValueError(f"unknown parameters {sorted(params)}")
    return out


def _response(name: str, rid: str, ids: list[int], text: str | None) -> kv2.ModelInferResponse:
    r = kv2.ModelInferResponse(model_name=name, model_version="1", id=rid)
    r.outputs.add(name="output_ids", datatype="INT64", shape=[len(ids)])
    r.raw_output_contents.append(np.asarray(ids, dtype="<i8").tobytes())
    if text is not None:
        r.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        r.raw_output_contents.append(_encode_bytes([text.encode()]))
    return r


class KServeServicer(kg.GRPCInferenceServiceServicer):
    def __init__(self, c: Coordinator) -> None:
        self.c = c

    def ServerLive(self, request: Any, context: Any) -> Any:
        return kv2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return kv2.ServerReadyResponse(ready=True)

    def ModelReady(self, request: kv2.ModelReadyRequest, context: Any) -> Any:
        with self.c.lock:
            m = self.c.models.get(request.name)
        return kv2.ModelReadyResponse(ready=m is not None and m.state == pb.MODEL_STATE_READY)

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return kv2.ServerMetadataResponse(name="pipeserve", version=VERSION, extensions=[])

    def ModelMetadata(self, request: kv2.ModelMetadataRequest, context: Any) -> Any:
        m = self.c.model(request.name, context, ready=False)
        T = kv2.ModelMetadataResponse.TensorMetadata
        if m.mode == "forward":
            info = m.info()
            return kv2.ModelMetadataResponse(
                name=m.name,
                versions=["1"],
                platform="pipeserve_forward",
                inputs=[
                    T(name=t.name, datatype=TORCH_NAMES.get(t.dtype, t.dtype), shape=t.shape)
                    for t in info.inputs
                ],
                outputs=[T(name="output_0", datatype="FP32", shape=[-1])],
            )
        return kv2.ModelMetadataResponse(
            name=m.name,
            versions=["1"],
            platform="pipeserve_generate",
            inputs=[
                T(name="text_input", datatype="BYTES", shape=[1]),
                T(name="input_ids", datatype="INT64", shape=[-1]),
            ],
            outputs=[
                T(name="text_output", datatype="BYTES", shape=[1]),
                T(name="output_ids", datatype="INT64", shape=[-1]),
            ],
        )

    def _run(self, req: kv2.ModelInferRequest, timeout: float | None) -> Iterator[Any]:
        try:
            gen = to_generate(req)
        except ValueError as e:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        call = self.c.open_generate(gen, timeout)
        try:
            yield from call
        except grpc.RpcError as e:
            raise CallError(e.code(), e.details() or "") from e
        finally:
            call.cancel()

    def ModelInfer(self, request: kv2.ModelInferRequest, context: Any) -> Any:
        self.c.authorize_client(context)
        with self.c.lock:
            m = self.c.models.get(request.model_name)
        if m is not None and m.mode == "forward":
            try:
                fwd = to_forward(request)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            try:
                return from_forward(request, self.c.forward(fwd, rpc.remaining(context)))
            except CallError as e:
                context.abort(e.code, e.message)
        ids: list[int] = []
        text, has_text = "", False
        try:
            for r in self._run(request, rpc.remaining(context)):
                ids += list(r.token_ids)
                text += r.text
                has_text |= bool(r.text)
        except CallError as e:
            context.abort(e.code, e.message)
        return _response(request.model_name, request.id, ids, text if has_text else None)

    def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        self.c.authorize_client(context)
        for req in request_iterator:
            try:
                for r in self._run(req, rpc.remaining(context)):
                    last = r.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                    if not r.token_ids and not last:
                        continue
                    out = _response(req.model_name, req.id, list(r.token_ids), r.text or None)
                    out.parameters["triton_final_response"].bool_param = last
                    yield kv2.ModelStreamInferResponse(infer_response=out)
            except CallError as e:
                yield kv2.ModelStreamInferResponse(error_message=f"{e.code.name}: {e.message}")
