"""The CSI controller's watch cache reconnects a wedged watch, and a wait always ends.

A real HTTP server on loopback stands in for the apiserver: its first watch answers with
headers and then never another byte (a connection wedged behind a dead NAT entry); the
cache must give up on it after its read timeout and see the event the next watch carries."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from opensds_csi.errors import DeadlineExceeded
from opensds_csi.store import ObjectStore

NS = "opensds-system"


class FakeApiserver(BaseHTTPRequestHandler):
    watches = 0
    release = threading.Event()

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: bytes, chunked: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not chunked:
            self.wfile.write(body)

    def do_GET(self) -> None:
        if "watch=true" not in self.path:
            self._send(json.dumps({"metadata": {"resourceVersion": "1"}, "items": []}).encode())
            return
        cls = type(self)
        cls.watches += 1
        self._send(b"", chunked=True)
        if cls.watches == 1:  # wedged: headers, then silence
            cls.release.wait(30)
            return
        event = json.dumps({"type": "ADDED", "object": {
            "metadata": {"name": "v", "namespace": NS, "uid": "u", "resourceVersion": "2"}}}).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.flush()
        cls.release.wait(30)


@pytest.fixture
def apiserver() -> Iterator[client.CustomObjectsApi]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApiserver)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    configuration = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield client.CustomObjectsApi(client.ApiClient(configuration))
    finally:
        FakeApiserver.release.set()
        server.shutdown()


def test_a_wedged_watch_reconnects_and_delivers_later_events(apiserver: client.CustomObjectsApi) -> None:
    store = ObjectStore(NS, api=apiserver, watch_timeout=0.5, watch_grace=0.5)
    store.PLURALS = ("volumes",)  # one watch is enough here
    store._synced = {"volumes": store._synced["volumes"]}
    store.start()
    try:
        assert store.wait_synced(5)
        found = store.wait_for("volumes", "v", lambda o: o is not None, 10, "volume v from the second watch")
        assert found is not None and found["metadata"]["uid"] == "u"
        assert FakeApiserver.watches >= 2
    finally:
        store.stop()


def test_waiting_for_an_object_that_never_comes_ends_with_deadline_exceeded() -> None:
    store = ObjectStore(NS)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="continues in the background"):
        store.wait_for("volumes", "never", lambda o: o is not None, 0.2, "volume never")
    assert time.monotonic() - start < 2
