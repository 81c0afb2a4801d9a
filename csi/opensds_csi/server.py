"""gRPC server on a unix socket, with one interceptor that logs calls and maps errors to codes.

Every call gets a request id and one log line with its method, the request with every
`csi_secret` field (node-stage/controller secrets) replaced by ***, its gRPC code and its
duration (as ceph-csi logs), so a failure in the CO's events can be found in our log and
no secret ever reaches it.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .errors import csi_error
from .proto import csi_pb2

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # grpc-stubs makes the interceptor generic; the runtime class is not subscriptable
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor

REDACTED = "***"
# Calls a CO repeats every few seconds: logged at DEBUG so the INFO log shows what changed things.
ROUTINE = frozenset({"Probe", "GetPluginInfo", "GetPluginCapabilities", "ControllerGetCapabilities",
                     "NodeGetCapabilities", "NodeGetInfo", "GetCapacity", "ListVolumes", "ListSnapshots",
                     "NodeGetVolumeStats", "ControllerGetVolume"})


def _is_secret(field: FieldDescriptor) -> bool:
    return bool(field.GetOptions().Extensions[csi_pb2.csi_secret]) or field.name == "secrets"


def _redact(message: Message) -> None:
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if _is_secret(field):
                for key in list(value):
                    value[key] = REDACTED
            elif value_field.message_type is not None:
                for item in value.values():
                    _redact(item)
        elif _is_secret(field):
            message.ClearField(field.name)
            if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
                setattr(message, field.name, REDACTED)
        elif field.message_type is not None:
            for item in (value if field.is_repeated else [value]):
                _redact(item)


def redacted(message: Message) -> str:
    """One-line text of a request with every secret value replaced by ***."""
    copy = type(message)()
    copy.CopyFrom(message)
    _redact(copy)
    return text_format.MessageToString(copy, as_one_line=True)


class LoggingAndErrors(_Interceptor):
    """Logs each call (id, method, redacted request, code, duration); any exception -> its CSI code."""

    _ids = itertools.count(1)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method, inner = details.method, handler.unary_unary
        short = method.rsplit("/", 1)[-1]
        level = logging.DEBUG if short in ROUTINE else logging.INFO

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            req_id = f"{os.getpid():x}-{next(self._ids)}"
            start = time.monotonic()
            if log.isEnabledFor(level):
                log.log(level, "ID %s %s request: %s", req_id, method, redacted(request))
            try:
                response = inner(request, context)
            except Exception as e:
                error = csi_error(e)
                took = 1000 * (time.monotonic() - start)
                if error.code_name == "INTERNAL":
                    log.exception("ID %s %s -> INTERNAL (%.1f ms)", req_id, method, took)
                else:
                    log.info("ID %s %s -> %s: %s (%.1f ms)", req_id, method, error.code_name, error.message, took)
                context.abort(getattr(grpc.StatusCode, error.code_name), error.message)
            log.log(level, "ID %s %s -> OK (%.1f ms)", req_id, method, 1000 * (time.monotonic() - start))
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
