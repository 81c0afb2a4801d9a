"""Entry point of the CSI plugin (`opensds-csi`): serves the Identity service on a unix socket.

Controller and node services come with the CSI issue; until then the plugin answers
GetPluginInfo, GetPluginCapabilities and Probe so sidecars can identify it.
"""
from __future__ import annotations

import argparse
import logging

from .identity import IdentityService
from .proto import csi_pb2_grpc
from .server import build_server


def main() -> None:
    parser = argparse.ArgumentParser(prog="opensds-csi", description=__doc__)
    parser.add_argument("--endpoint", default="unix:///csi/csi.sock")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(args.endpoint)
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(ready=lambda: True, controller=False), server)
    server.start()
    logging.getLogger("opensds.csi").info("serving on %s", args.endpoint)
    server.wait_for_termination()
