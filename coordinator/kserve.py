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

from . import codec
from .core import Coordinator
from .edge import check_token, client_call, edge
from .errors import CoordinatorError, InvalidRequest
from .kserve_codec import TORCH_NAMES, encode_bytes, to_forward, to_generate
from .relay import ClientCall, Relay

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
    """Inference calls go through the same :class:`Relay` as ``pipeserve.v1`` Generate
    (request id, metrics, replay after a lost worker, per-client limits); metadata calls
    are open, as KServe's health and metadata probes expect."""

    def __init__(self, c: Coordinator, relay: Relay, token: str = "") -> None:
        self.c, self.relay, self.token = c, relay, token

    def add_to(self, server: grpc.Server) -> None:
        kg.add_GRPCInferenceServiceServicer_to_server(self, server)

    def authorize(self, context: grpc.ServicerContext) -> None:
        pass  # liveness and metadata: open

    def _authorize_client(self, context: grpc.ServicerContext) -> None:
        check_token(context, self.token, "client calls", "PIPESERVE_CLIENT_TOKEN")

    def ServerLive(self, request: Any, context: Any) -> Any:
        return kv2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return kv2.ServerReadyResponse(ready=True)

    def ModelReady(self, request: kv2.ModelReadyRequest, context: Any) -> Any:
        with self.c.lock:
            m = self.c.models.get(request.name)
        return kv2.ModelReadyResponse(ready=m is not None and m.ready)

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return kv2.ServerMetadataResponse(name="pipeserve", version=VERSION, extensions=[])

    @edge
    def ModelMetadata(self, request: kv2.ModelMetadataRequest, context: Any) -> Any:
        m = self.c.find(request.name, ready=False)
        T = kv2.ModelMetadataResponse.TensorMetadata
        if m.mode == "forward":
            info = codec.model_info(m)
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

    @edge
    def ModelConfig(self, request: kv2.ModelConfigRequest, context: Any) -> Any:
        """Triton's model configuration, from the same facts as :meth:`ModelMetadata`."""
        m = self.c.find(request.name, ready=False)  # NOT_FOUND before anything else
        meta = self.ModelMetadata(kv2.ModelMetadataRequest(name=m.name), context)
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

    def ModelInfer(self, request: kv2.ModelInferRequest, context: Any) -> Any:
        self._authorize_client(context)
        try:
            return self._infer(request, context)
        except Exception as e:
            rpc.abort_for(context, e)

    def _infer(self, request: kv2.ModelInferRequest, context: Any) -> Any:
        with self.c.lock:
            m = self.c.models.get(request.model_name)
        if m is not None and m.mode == "forward":
            fwd = _checked(to_forward, request)
            return from_forward(request, self.c.forward(fwd, rpc.remaining(context)))
        gen, batched = _checked(to_generate, request)
        ids: list[int] = []
        text, has_text = "", False
        for r in self.relay.generate(gen, client_call(context), "ModelInfer"):
            ids += list(r.token_ids)
            text += r.text
            has_text |= bool(r.text)
        return _response(request.model_name, request.id, ids, text if has_text else None, batched)

    def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        """One response per new token; a request's error comes back in-band (the stream of
        requests goes on)."""
        self._authorize_client(context)
        call: ClientCall | None = None
        for req in request_iterator:
            try:
                gen, batched = _checked(to_generate, req)
                call = call or client_call(context)  # one request id per stream
                yield from self._stream(req, gen, batched, call)
            except CoordinatorError as e:
                yield kv2.ModelStreamInferResponse(error_message=f"{e.status}: {e}")

    def _stream(
        self, req: Any, gen: pb.GenerateRequest, batched: bool, call: ClientCall
    ) -> Iterator[Any]:
        for r in self.relay.generate(gen, call, "ModelStreamInfer"):
            last = r.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            if not r.token_ids and not last:
                continue
            ids, text = list(r.token_ids), r.text or None
            out = _response(req.model_name, req.id, ids, text, batched)
            out.parameters["triton_final_response"].bool_param = last
            yield kv2.ModelStreamInferResponse(infer_response=out)


def _checked(parse: Any, req: Any) -> Any:
    """``parse(req)``; its ValueError is the request's fault (INVALID_ARGUMENT)."""
    try:
        return parse(req)
    except ValueError as e:
        raise InvalidRequest(str(e)) from e
