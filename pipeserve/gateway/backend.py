"""The gateway's view of the coordinator: one ``grpc.aio`` channel (TLS when configured),
the models that are READY, and each model's tokenizer (read from its checkpoint directory:
a few files, never weights)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from pipeserve import rpc
from pipeserve.gateway.errors import ApiError, from_grpc
from pipeserve.v1 import pipeserve_pb2 as pb
from pipeserve.v1 import pipeserve_pb2_grpc as pbg

__all__ = ["Backend", "ModelFiles"]

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str]]
MODELS_TTL_S = 2.0
"""How long a ListModels answer is reused to route requests (GET /v1/models always asks).
Past it, a model the answer had READY is still routed at once while a new ListModels runs
beside the request (the coordinator refuses a Generate for a model no longer READY with its
own status); an unknown or not-READY model waits for the new answer."""


@dataclass(slots=True)
class ModelFiles:
    """What the gateway reads from a model's checkpoint: its tokenizer (None when it cannot
    read one) and the model's context length (None: unknown or unbounded)."""

    tokenizer: Any
    context: int | None
    where: str


def aio_channel(address: str, tls: rpc.TLS) -> grpc.aio.Channel:
    """An asyncio channel with the options (and TLS) of :func:`pipeserve.rpc.channel`."""
    if tls.enabled:
        options = [*rpc.CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", tls.server_name)]
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)
    return grpc.aio.insecure_channel(address, options=rpc.CHANNEL_OPTIONS)


def _read_files(directory: str) -> ModelFiles:
    from pipeline_core.sampling import context_length
    from pipeline_core.source import hf_config, hf_tokenizer

    try:
        tok = hf_tokenizer(directory)
    except Exception as e:  # a broken tokenizer: text requests get a clear 400, ids still work
        log.warning("cannot load the tokenizer in %s: %s", directory, e)
        tok = None
    try:
        context = context_length(hf_config(directory))
    except Exception:
        context = None
    return ModelFiles(tokenizer=tok, context=context, where=directory)


class Backend:
    """Create and use inside one event loop (``grpc.aio`` channels belong to their loop)."""

    def __init__(
        self,
        address: str,
        tls: rpc.TLS | None = None,
        tokenizer_dirs: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.address = address
        self.tls = tls or rpc.TLS()
        self.tokenizer_dirs = tokenizer_dirs or {}
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: pbg.InferenceStub | None = None
        self._models: dict[str, pb.ModelInfo] = {}
        self._models_at = -1e9
        self._files: dict[tuple[str, str], ModelFiles] = {}
        self._files_lock = asyncio.Lock()
        self._refresh: asyncio.Task[Any] | None = None

    @property
    def stub(self) -> pbg.InferenceStub:
        if self._stub is None:
            self._channel = aio_channel(self.address, self.tls)
            self._stub = pbg.InferenceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def list_models(self, md: Metadata) -> list[pb.ModelInfo]:
        """Every model the coordinator knows (raises :class:`ApiError`)."""
        try:
            r = await self.stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=5)
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e) from None
        self._models = {m.name: m for m in r.models}
        self._models_at = time.monotonic()
        return list(r.models)

    async def _list_quietly(self, md: Metadata) -> None:
        try:
            await self.list_models(md)
        except ApiError as e:  # the next request that needs the answer asks again
            log.debug("background ListModels: %s", e.message)

    async def ready_models(self, md: Metadata) -> list[pb.ModelInfo]:
        """The models clients can generate with now."""
        return [
            m
            for m in await self.list_models(md)
            if m.state == pb.MODEL_STATE_READY and "generate" in m.capabilities
        ]

    async def model(self, name: str, md: Metadata) -> pb.ModelInfo:
        """A READY generating model by name: 404 unknown, 503 not ready, 400 forward-only."""
        m = self._models.get(name)
        stale = time.monotonic() - self._models_at > MODELS_TTL_S
        if m is None or (stale and m.state != pb.MODEL_STATE_READY):
            await self.list_models(md)
            m = self._models.get(name)
        elif stale and (self._refresh is None or self._refresh.done()):
            # a round trip to the coordinator off the request's path (time to first text)
            self._refresh = asyncio.create_task(self._list_quietly(md))
        if m is None:
            known = ", ".join(sorted(self._models)) or "none loaded"
            raise ApiError(404, f"model {name!r} not found (models: {known})", param="model")
        if m.state != pb.MODEL_STATE_READY:
            state = pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_")
            raise ApiError(503, f"model {name!r} is not ready ({state}); retry later")
        if "generate" not in m.capabilities:
            raise ApiError(
                400, f"model {name!r} does not generate text (forward mode)", param="model"
            )
        return m

    async def files(self, m: pb.ModelInfo) -> ModelFiles:
        """The model's tokenizer and context length (read once per checkpoint)."""
        directory = self.tokenizer_dirs.get(m.name, m.checkpoint)
        key = (m.name, directory)
        if key not in self._files:
            async with self._files_lock:
                if key not in self._files:
                    self._files[key] = await asyncio.to_thread(_read_files, directory)
        return self._files[key]

    def generate(self, req: pb.GenerateRequest, md: Metadata) -> Any:
        """Start a streaming Generate call (iterate it; ``cancel()`` frees its KV cache)."""
        return self.stub.Generate(req, metadata=md, timeout=self.timeout)
