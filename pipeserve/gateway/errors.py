"""OpenAI error objects and the HTTP status each ``pipeserve.v1`` status code becomes."""

from __future__ import annotations

from typing import Any

import grpc

__all__ = ["ApiError", "from_grpc", "http_status"]

_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,  # the client went away (nginx's code; nobody reads it)
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.FAILED_PRECONDITION: 503,  # model not ready / too few workers: retry later
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status for a gRPC status code (500 for anything unexpected)."""
    return _HTTP.get(code, 500)


class ApiError(Exception):
    """A request that ends in an OpenAI error object with HTTP status ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}`` as the OpenAI API (and its clients) shape it."""
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.status,
            }
        }


def from_grpc(e: grpc.aio.AioRpcError | grpc.RpcError) -> ApiError:
    """The coordinator's status and message, as an :class:`ApiError`."""
    code = e.code()
    details = e.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        details = f"the coordinator cannot be reached ({details}); check --coordinator"
    return ApiError(http_status(code), f"{code.name}: {details}")
