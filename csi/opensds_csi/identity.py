"""CSI Identity service: who we are, what we offer, and whether we are ready."""
from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from .proto import csi_pb2, csi_pb2_grpc

DRIVER_NAME = "block.csi.opensds.io"


def _vendor_version() -> str:
    try:
        return version("opensds-k8s")
    except PackageNotFoundError:
        return "0.0.0-dev"


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, ready: Callable[[], bool], controller: bool) -> None:
        self._ready = ready
        self._controller = controller

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=_vendor_version())

    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext) -> csi_pb2.GetPluginCapabilitiesResponse:
        service = csi_pb2.PluginCapability.Service
        capabilities = [csi_pb2.PluginCapability(service=service(type=service.VOLUME_ACCESSIBILITY_CONSTRAINTS))]
        if self._controller:
            capabilities.append(csi_pb2.PluginCapability(service=service(type=service.CONTROLLER_SERVICE)))
        expansion = csi_pb2.PluginCapability.VolumeExpansion
        capabilities.append(csi_pb2.PluginCapability(volume_expansion=expansion(type=expansion.ONLINE)))
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=capabilities)

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready=BoolValue(value=self._ready()))
