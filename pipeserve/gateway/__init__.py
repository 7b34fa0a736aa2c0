"""OpenAI-compatible HTTP gateway: a client of the coordinator's ``pipeserve.v1`` API that
holds no model (scale it horizontally).  ``pipeserve gateway --coordinator HOST:PORT``.

* ``app``: the Starlette routes and OpenAI response shapes; ``requests``: request bodies ->
  ``GenerateRequest``; ``streams``: one choice = one Generate stream, stop strings applied;
  ``chunks``: the server-sent events of a streamed response (a template per response);
  ``stops``: stop strings across token boundaries; ``backend``: the ``grpc.aio`` channel,
  READY models, tokenizers; ``errors``: gRPC status -> HTTP status + OpenAI error object.
"""

from pipeserve.gateway.app import create_app
from pipeserve.gateway.backend import Backend
from pipeserve.gateway.server import GatewayConfig, serve

__all__ = ["Backend", "GatewayConfig", "create_app", "serve"]
