"""Liveness over HTTP for a CSI plugin: what the livenessprobe sidecar does, in-process.

`GET /healthz` calls the plugin's own Identity.Probe through its CSI socket (so a wedged gRPC
server or a deleted socket fails the probe, as a kubelet liveness check should notice), then any
extra checks (the node plugin adds its kubelet registration). 200 with "ok", 500 with the reason.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from .proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


def probe_check(endpoint: str, timeout: float = 3.0) -> Check:
    """A check calling Identity.Probe on `endpoint` (unix://...)."""
    def check() -> tuple[bool, str]:
        try:
            with grpc.insecure_channel(endpoint) as channel:
                reply = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=timeout)
        except grpc.RpcError as err:
            return False, f"Probe on {endpoint} failed: {err.code().name}"
        if reply.HasField("ready") and not reply.ready.value:
            return False, "plugin reports not ready"
        return True, "ok"
    return check


def run_checks(checks: Sequence[Check]) -> tuple[bool, str]:
    for check in checks:
        ok, why = check()
        if not ok:
            return False, why
    return True, "ok"


def serve(address: str, checks: Sequence[Check]) -> ThreadingHTTPServer:
    """Serve /healthz on host:port in a daemon thread; returns the server (for shutdown in tests)."""
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/healthz":
                self.send_error(404)
                return
            ok, why = run_checks(checks)
            body = (why + "\n").encode()
            self.send_response(200 if ok else 500)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            if not ok:
                log.warning("liveness check failed: %s", why)

        def log_message(self, format: str, *args: object) -> None:  # kubelet probes every few seconds
            pass

    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
    log.info("liveness endpoint http://%s/healthz", address)
    return server
