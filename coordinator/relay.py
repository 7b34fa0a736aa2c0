"""The relay: every client's generation call -- ``pipeserve.v1`` Generate and KServe's
ModelInfer / ModelStreamInfer alike -- goes to the model's stage-0 worker through here, so
each gets the same: a bounded number of streams per client, a request id (sent to the worker,
in its logs), metrics per model and method, the call counted in the model's calls, and a
replay after a lost worker that the client never sees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from pipeline_core import RequestError
from pipeserve.observe import REQUEST_ID, CoordinatorMetrics

from .core import Coordinator
from .errors import CoordinatorError, InvalidRequest, LimitReached, Unavailable, UpstreamError, clip

__all__ = ["ClientCall", "Relay"]

log = logging.getLogger(__name__)


class ClientCall(Protocol):
    """The client's side of one relayed call."""

    peer: str
    """The client's address, without its port (streams are bounded per address)."""
    request_id: str

    def is_active(self) -> bool: ...

    def remaining(self) -> float | None:
        """Seconds left before the client's deadline (None: no deadline)."""

    def on_done(self, fn: Callable[[], Any]) -> None:
        """Call ``fn`` when the client's call ends (cancelled, deadline, finished)."""


class Relay:
    def __init__(
        self, c: Coordinator, metrics: CoordinatorMetrics, check: Callable[[Any], object]
    ) -> None:
        self.c = c
        self.metrics = metrics
        self.check = check
        """Validates a request without the model (raises ``RequestError``)."""

    def generate(self, request: Any, call: ClientCall, method: str = "Generate") -> Iterator[Any]:
        """Relay a Generate call to the stage-0 worker.  If the pipeline loses a worker
        mid-stream, wait for it to be re-formed and replay the request with the tokens
        already streamed (``resume_token_ids``): the client sees one uninterrupted stream.
        ``max_streams_per_client`` bounds the calls one client address has in flight,
        whichever API they came by; an HTTP gateway is one client."""
        c = self.c
        with c.lock:
            n = c.client_streams[call.peer]
            if c.max_streams_per_client and n >= c.max_streams_per_client:
                raise LimitReached(
                    f"{clip(call.peer)} already has {n} requests in flight (the limit per "
                    "client); wait for one to finish"
                )
            c.client_streams[call.peer] += 1
        try:
            yield from self._relay(request, call, method)
        finally:
            with c.lock:
                c.client_streams[call.peer] -= 1
                if not c.client_streams[call.peer]:
                    del c.client_streams[call.peer]  # bounded by the clients in flight

    def _relay(self, request: Any, call: ClientCall, method: str) -> Iterator[Any]:
        c = self.c
        REQUEST_ID.set(call.request_id)
        track = self.metrics.track(request.model, method)
        status = "OK"
        streamed: list[int] = []
        try:
            try:  # a bad request is refused now, never after waiting for a recovery
                self.check(request)
            except RequestError as e:
                raise InvalidRequest(str(e)) from e
            c.find(request.model, ready=False)
            while True:
                req = type(request)()
                req.CopyFrom(request)
                resumed = len(streamed)
                if streamed:
                    req.resume_token_ids.extend(streamed)
                epoch = c.models[request.model].epoch if request.model in c.models else 0
                try:
                    m, w = c.stage0(request.model)
                    upstream = w.client.generate(req, call.remaining(), call.request_id)
                except CoordinatorError:
                    if streamed and c.wait_recovered(request.model, epoch, call.is_active):
                        continue
                    raise
                m.calls.add(upstream)
                call.on_done(upstream.cancel)  # client cancelled / deadline: upstream too
                try:
                    for r in upstream:
                        if r.finish_reason and resumed:  # usage of the whole request
                            r.usage.prompt_tokens -= resumed
                            r.usage.completion_tokens += resumed
                        streamed += r.token_ids
                        track.tokens(len(r.token_ids))
                        yield r
                    return
                except UpstreamError as e:
                    if not call.is_active():
                        return
                    if e.lost and c.wait_recovered(request.model, epoch, call.is_active):
                        log.info("replaying after %d streamed tokens", len(streamed))
                        continue
                    m = c.models.get(request.model)
                    if e.lost and m is not None and (m.waiting or m.recovering):
                        # not the request's own failure: the relay cancelled it
                        raise Unavailable(
                            m.waiting or f"model {m.name!r} is recovering: {m.error}"
                        ) from e
                    raise
                finally:
                    m.calls.discard(upstream)
        except CoordinatorError as e:
            status = e.status
            raise
        except GeneratorExit:
            status = "CANCELLED"
            raise
        finally:
            if not call.is_active() and status == "OK":
                status = "CANCELLED"
            track.done(status)
            log.info("generate on %s: %s", request.model, status)
