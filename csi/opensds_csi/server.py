"""gRPC server on a unix socket, with one interceptor that logs calls and maps errors to codes."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc

from .errors import CsiError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # grpc-stubs makes the interceptor generic; the runtime class is not subscriptable
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor


class LoggingAndErrors(_Interceptor):
    """Logs each call with its duration; CsiError -> its code, anything else -> INTERNAL."""

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method, inner = details.method, handler.unary_unary

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            try:
                response = inner(request, context)
            except CsiError as e:
                log.info("%s -> %s: %s (%.1f ms)", method, e.code_name, e.message, 1000 * (time.monotonic() - start))
                context.abort(getattr(grpc.StatusCode, e.code_name), e.message)
            except Exception as e:
                log.exception("%s failed", method)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
            log.debug("%s ok (%.1f ms)", method, 1000 * (time.monotonic() - start))
            return response

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def unix_socket_path(endpoint: str) -> str:
    if not endpoint.startswith("unix://"):
        raise ValueError(f"endpoint must be unix:///path, got {endpoint!r}")
    return endpoint[len("unix://"):]


def build_server(endpoint: str, max_workers: int = 16) -> grpc.Server:
    """A server bound to the endpoint's socket (a stale socket file from a crash is removed)."""
    path = unix_socket_path(endpoint)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=[LoggingAndErrors()])
    server.add_insecure_port(f"unix://{path}")
    return server
