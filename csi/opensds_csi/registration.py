"""Registering the node plugin with kubelet: node-driver-registrar's job, done in-process.

kubelet watches `<kubelet root>/plugins_registry/` for sockets. For each one it calls GetInfo; for
a CSIPlugin it dials the endpoint GetInfo names, calls NodeGetInfo, writes the CSINode (node id,
topology keys) and the node's `csi.volume.kubernetes.io/nodeid` annotation, then tells the plugin
the outcome with NotifyRegistrationStatus. kubelet scans the directory again when it restarts, so
a socket left in place is registered again; the plugin re-creates its socket whenever it starts
(and whenever the socket file disappears), which is how it re-registers.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent import futures
from pathlib import Path

import grpc

from .proto import pluginregistration_pb2 as pb
from .proto import pluginregistration_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CSI_PLUGIN = "CSIPlugin"  # kubelet's plugin type for CSI drivers (pluginregistration/v1 constants)
SUPPORTED_VERSIONS = ("1.0.0",)


class RegistrationService(pb_grpc.RegistrationServicer):
    """Answers kubelet's GetInfo and records what kubelet says about the registration."""

    def __init__(self, driver_name: str, kubelet_endpoint: str) -> None:
        self._info = pb.PluginInfo(type=CSI_PLUGIN, name=driver_name, endpoint=kubelet_endpoint,
                                   supported_versions=list(SUPPORTED_VERSIONS))
        self._lock = threading.Lock()
        self.registered: bool | None = None  # None: kubelet has not answered yet
        self.error = ""

    def GetInfo(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.PluginInfo:
        return self._info

    def NotifyRegistrationStatus(self, request: pb.RegistrationStatus,
                                 context: grpc.ServicerContext) -> pb.RegistrationStatusResponse:
        with self._lock:
            self.registered, self.error = request.plugin_registered, request.error
        if request.plugin_registered:
            log.info("kubelet registered %s (CSI endpoint %s)", self._info.name, self._info.endpoint)
        else:
            log.error("kubelet refused to register %s: %s", self._info.name, request.error)
        return pb.RegistrationStatusResponse()


class Registrar:
    """Serves RegistrationService on `<registration dir>/<driver>-reg.sock` (the name kubelet expects)."""

    def __init__(self, driver_name: str, registration_dir: str, kubelet_endpoint: str) -> None:
        self.socket = Path(registration_dir) / f"{driver_name}-reg.sock"
        self.service = RegistrationService(driver_name, kubelet_endpoint)
        self._server: grpc.Server | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """(Re)create the socket: a stale one from an earlier run would never be dialled again."""
        with self._lock:
            if self._server is not None:
                self._server.stop(None)
            self.socket.parent.mkdir(parents=True, exist_ok=True)
            self.socket.unlink(missing_ok=True)
            self.service.registered, self.service.error = None, ""
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            pb_grpc.add_RegistrationServicer_to_server(self.service, server)
            server.add_insecure_port(f"unix://{self.socket}")
            server.start()
            os.chmod(self.socket, 0o600)  # only kubelet (root) talks to it
            self._server = server
        log.info("registration socket %s ready for kubelet", self.socket)

    def healthy(self) -> tuple[bool, str]:
        """Unhealthy when kubelet refused us or the socket vanished (kubelet then can't find us)."""
        if not self.socket.exists():
            return False, f"registration socket {self.socket} is gone"
        if self.service.registered is False:
            return False, f"kubelet refused the registration: {self.service.error}"
        return True, "registered" if self.service.registered else "waiting for kubelet"

    def keep_socket(self) -> None:
        """Re-create the socket if something removed it (e.g. kubelet's plugin dir was wiped)."""
        if not self.socket.exists():
            log.warning("registration socket %s disappeared: re-creating it", self.socket)
            self.start()

    def keep_registered(self, stopped: threading.Event, interval: float = 10.0) -> None:
        """Until `stopped` is set: re-create the socket whenever it goes (kubelet then registers us again)."""
        while not stopped.wait(interval):
            try:
                self.keep_socket()
            except OSError:
                log.exception("could not re-create the registration socket")

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.stop(2).wait()
                self._server = None
            self.socket.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m opensds_csi.registration`: register another CSI driver with kubelet.

    Stands in for node-driver-registrar beside a third-party node plugin (bench/pods.py uses it
    for csi-driver-host-path); our own node plugin registers in-process (`--registration-dir`).
    """
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m opensds_csi.registration", description=main.__doc__)
    parser.add_argument("--driver-name", required=True)
    parser.add_argument("--registration-dir", required=True, help="kubelet's plugins_registry as mounted here")
    parser.add_argument("--kubelet-registration-path", required=True, help="the driver's CSI socket on the host")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registrar = Registrar(args.driver_name, args.registration_dir, args.kubelet_registration_path)
    registrar.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    registrar.keep_registered(stopped)
    registrar.stop()


if __name__ == "__main__":
    main()
