"""The node plugin registers itself with kubelet and reports its liveness (no sidecars needed)."""
from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from opensds_csi import health
from opensds_csi.identity import IdentityService
from opensds_csi.proto import csi_pb2_grpc
from opensds_csi.proto import pluginregistration_pb2 as pb
from opensds_csi.proto import pluginregistration_pb2_grpc as pb_grpc
from opensds_csi.registration import Registrar

DRIVER = "block.csi.opensds.io"
KUBELET_PATH = f"/var/lib/kubelet/plugins/{DRIVER}/csi.sock"


@pytest.fixture
def short_tmp():  # type: ignore[no-untyped-def]
    """pytest's tmp_path is too long for a unix socket path (108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="reg", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def registrar(short_tmp: Path):  # type: ignore[no-untyped-def]
    reg = Registrar(DRIVER, str(short_tmp / "plugins_registry"), KUBELET_PATH)
    reg.start()
    yield reg
    reg.stop()


def _stub(reg: Registrar) -> pb_grpc.RegistrationStub:
    return pb_grpc.RegistrationStub(grpc.insecure_channel(f"unix://{reg.socket}"))


def test_socket_is_named_as_kubelet_expects_and_only_root_may_use_it(registrar: Registrar) -> None:
    assert registrar.socket.name == f"{DRIVER}-reg.sock"
    assert registrar.socket.stat().st_mode & 0o777 == 0o600


def test_get_info_names_a_csi_plugin_and_the_socket_path_kubelet_sees(registrar: Registrar) -> None:
    info = _stub(registrar).GetInfo(pb.InfoRequest(), timeout=5)
    assert (info.type, info.name, info.endpoint) == ("CSIPlugin", DRIVER, KUBELET_PATH)
    assert list(info.supported_versions) == ["1.0.0"]


def test_a_refused_registration_makes_the_plugin_unhealthy(registrar: Registrar) -> None:
    assert registrar.healthy() == (True, "waiting for kubelet")
    _stub(registrar).NotifyRegistrationStatus(pb.RegistrationStatus(plugin_registered=True), timeout=5)
    assert registrar.healthy() == (True, "registered")
    _stub(registrar).NotifyRegistrationStatus(
        pb.RegistrationStatus(plugin_registered=False, error="version 9 unsupported"), timeout=5)
    ok, why = registrar.healthy()
    assert not ok and "version 9 unsupported" in why


def test_a_removed_socket_is_recreated_so_kubelet_registers_the_plugin_again(registrar: Registrar) -> None:
    registrar.socket.unlink()
    assert registrar.healthy()[0] is False
    registrar.keep_socket()
    assert registrar.socket.exists()
    assert _stub(registrar).GetInfo(pb.InfoRequest(), timeout=5).name == DRIVER


def test_a_restarted_plugin_replaces_a_stale_socket(short_tmp: Path) -> None:
    stale = short_tmp / "plugins_registry" / f"{DRIVER}-reg.sock"
    stale.parent.mkdir()
    stale.write_text("left by a killed plugin")
    reg = Registrar(DRIVER, str(stale.parent), KUBELET_PATH)
    reg.start()
    try:
        assert _stub(reg).GetInfo(pb.InfoRequest(), timeout=5).endpoint == KUBELET_PATH
    finally:
        reg.stop()
    assert not stale.exists()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_healthz_probes_the_plugin_through_its_socket_and_fails_when_it_is_gone(short_tmp: Path) -> None:
    endpoint = f"unix://{short_tmp}/csi.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(lambda: True, controller=False), server)
    server.add_insecure_port(endpoint)
    server.start()
    http = health.serve("127.0.0.1:0", [health.probe_check(endpoint, timeout=1)])
    url = f"http://127.0.0.1:{http.server_address[1]}/healthz"
    try:
        assert _get(url) == (200, "ok\n")
        server.stop(None).wait()
        status, body = _get(url)
        assert status == 500 and "Probe" in body
    finally:
        http.shutdown()
