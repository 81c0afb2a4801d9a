"""The CSI Identity service over a real unix socket, and the error -> gRPC code mapping."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from opensds_csi.errors import Aborted
from opensds_csi.identity import DRIVER_NAME, IdentityService
from opensds_csi.proto import csi_pb2, csi_pb2_grpc
from opensds_csi.server import build_server


class Flaky(IdentityService):
    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        raise Aborted("an operation on volume v1 is already in progress")

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        raise RuntimeError("boom")


def serve(tmp_path: Path, service: IdentityService) -> Iterator[csi_pb2_grpc.IdentityStub]:
    endpoint = f"unix://{tmp_path}/csi.sock"
    server = build_server(endpoint, max_workers=2)
    csi_pb2_grpc.add_IdentityServicer_to_server(service, server)
    server.start()
    with grpc.insecure_channel(endpoint) as channel:
        yield csi_pb2_grpc.IdentityStub(channel)
    server.stop(None)


@pytest.fixture
def identity(tmp_path: Path) -> Iterator[csi_pb2_grpc.IdentityStub]:
    yield from serve(tmp_path, IdentityService(ready=lambda: True, controller=True))


def test_plugin_info_names_the_driver(identity: csi_pb2_grpc.IdentityStub) -> None:
    info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == DRIVER_NAME and info.vendor_version


def test_capabilities_offer_controller_topology_and_online_expansion(identity: csi_pb2_grpc.IdentityStub) -> None:
    caps = identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    service = csi_pb2.PluginCapability.Service
    assert services == {service.CONTROLLER_SERVICE, service.VOLUME_ACCESSIBILITY_CONSTRAINTS}
    expansion = [c.volume_expansion.type for c in caps if c.HasField("volume_expansion")]
    assert expansion == [csi_pb2.PluginCapability.VolumeExpansion.ONLINE]


def test_probe_reports_readiness(tmp_path: Path) -> None:
    for stub in serve(tmp_path, IdentityService(ready=lambda: False, controller=False)):
        assert stub.Probe(csi_pb2.ProbeRequest()).ready.value is False


def test_errors_become_the_prescribed_grpc_codes(tmp_path: Path) -> None:
    for stub in serve(tmp_path, Flaky(ready=lambda: True, controller=False)):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert err.value.details() == "an operation on volume v1 is already in progress"
        with pytest.raises(grpc.RpcError) as err:
            stub.Probe(csi_pb2.ProbeRequest())
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "RuntimeError: boom" in (err.value.details() or "")
