"""KServe / Triton Open Inference Protocol v2 (``inference.GRPCInferenceService``) on the
coordinator, so ``tritonclient`` and KServe clients work unchanged.

A generation model takes ``text_input`` (BYTES) or ``input_ids`` (INT32/INT64) and the
parameters ``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
``repetition_penalty``, ``ignore_eos``; it returns ``output_ids`` (INT64) and, with a
tokenizer, ``text_output`` (BYTES).  ``ModelStreamInfer`` answers one response per new token
(Triton's decoupled style, the last flagged ``triton_final_response``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from pipeserve import rpc
from pipeserve.inference import grpc_predict_v2_pb2 as kv2
from pipeserve.inference import grpc_predict_v2_pb2_grpc as kg
from pipeserve.v1 import pipeserve_pb2 as pb

from .kserve_codec import TORCH_NAMES, encode_bytes, to_forward, to_generate
from .server import CallError, Coordinator

__all__ = ["KServeServicer"]

VERSION = "0.1.0"


def from_forward(req: kv2.ModelInferRequest, res: pb.ForwardResponse) -> kv2.ModelInferResponse:
    r = kv2.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
    for t in res.outputs:
        r.outputs.add(name=t.name, datatype=TORCH_NAMES[t.dtype], shape=list(t.shape))
        r.raw_output_contents.append(t.data)
    return r


def _response(
    name: str, rid: str, ids: list[int], text: str | None, batched: bool
) -> kv2.ModelInferResponse:
    r = kv2.ModelInferResponse(model_name=name, model_version="1", id=rid)
    r.outputs.add(
        name="output_ids", datatype="INT64", shape=[1, len(ids)] if batched else [len(ids)]
    )
    r.raw_output_contents.append(np.asarray(ids, dtype="<i8").tobytes())
    if text is not None:
        r.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        r.raw_output_contents.append(encode_bytes([text.encode()]))
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
                T(name="input_ids", datatype="INT64", shape=[1, -1]),
            ],
            outputs=[
                T(name="text_output", datatype="BYTES", shape=[1]),
                T(name="output_ids", datatype="INT64", shape=[1, -1]),
            ],
        )

    def ModelConfig(self, request: kv2.ModelConfigRequest, context: Any) -> Any:
        """Triton's model configuration, from the same facts as :meth:`ModelMetadata`."""
        meta = self.ModelMetadata(kv2.ModelMetadataRequest(name=request.name), context)
        types = kv2.DataType.keys()

        def dtype(name: str) -> int:
            t = "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}"
            return kv2.DataType.Value(t) if t in types else kv2.TYPE_INVALID

        return kv2.ModelConfigResponse(
            config=kv2.ModelConfig(
                name=meta.name,
                platform=meta.platform,
                backend="pipeserve",
                max_batch_size=0,
                input=[
                    kv2.ModelInput(
                        name=t.name,
                        data_type=dtype(t.datatype),
                        dims=t.shape,
                        optional=meta.platform == "pipeserve_generate",  # one of the two
                    )
                    for t in meta.inputs
                ],
                output=[
                    kv2.ModelOutput(name=t.name, data_type=dtype(t.datatype), dims=t.shape)
                    for t in meta.outputs
                ],
            )
        )

    def _run(self, gen: pb.GenerateRequest, context: Any, method: str) -> Iterator[Any]:
        """The pipeserve.v1 relay (validation, request id, metrics, replay after a lost
        worker) for one KServe request; its errors raise :class:`CallError`."""
        yield from self.c.relay_generate(gen, _Relayed(context), method=method)

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
            gen, batched = _parse(request)
            for r in self._run(gen, context, "ModelInfer"):
                ids += list(r.token_ids)
                text += r.text
                has_text |= bool(r.text)
        except CallError as e:
            context.abort(e.code, e.message)
        return _response(request.model_name, request.id, ids, text if has_text else None, batched)

    def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        self.c.authorize_client(context)
        for req in request_iterator:
            try:
                gen, batched = _parse(req)
                for r in self._run(gen, context, "ModelStreamInfer"):
                    last = r.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                    if not r.token_ids and not last:
                        continue
                    ids, text = list(r.token_ids), r.text or None
                    out = _response(req.model_name, req.id, ids, text, batched)
                    out.parameters["triton_final_response"].bool_param = last
                    yield kv2.ModelStreamInferResponse(infer_response=out)
            except CallError as e:
                msg = f"{e.code.name}: {e.message}"
                yield kv2.ModelStreamInferResponse(error_message=msg)


def _parse(req: kv2.ModelInferRequest) -> tuple[pb.GenerateRequest, bool]:
    try:
        return to_generate(req)
    except ValueError as e:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e


class _Relayed:
    """A KServe call's context as :meth:`Coordinator.relay_generate` uses it: an abort raises
    :class:`CallError` (a stream of KServe requests answers each error in-band), and the
    request-id metadata goes out once per call."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.sent = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.context, name)

    def send_initial_metadata(self, md: Any) -> None:
        if not self.sent:
            self.sent = True
            self.context.send_initial_metadata(md)

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise CallError(code, message)
