"""Entry point of the CSI plugin (`opensds-csi --role controller|node|all`).

One process per role, as Kubernetes deploys them: the controller (a Deployment beside
external-provisioner/-attacher/-resizer/-snapshotter) only talks to the API; the node plugin
(a DaemonSet beside kubelet) only touches the local machine and needs no API access. The node
plugin registers itself with kubelet (`--registration-dir`) and both serve a liveness endpoint
(`--health-address`), so neither needs node-driver-registrar nor the livenessprobe sidecar.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

import grpc

from opensds_operator.api import valid_node_name

from . import health
from .identity import DRIVER_NAME, IdentityService
from .proto import csi_pb2_grpc
from .registration import Registrar
from .server import build_server

log = logging.getLogger("opensds.csi")


def _topology(pairs: list[str]) -> dict[str, str]:
    segments = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"--topology wants key=value, got {pair!r}")
        segments[key] = value
    return segments


def build(args: argparse.Namespace) -> grpc.Server:
    server = build_server(args.endpoint, max_workers=args.workers)
    if args.role in ("controller", "all"):
        from .controller import ControllerService
        from .store import ObjectStore

        store = ObjectStore(args.namespace)
        store.start()
        if not store.wait_synced(30):
            log.warning("volume/snapshot caches not synced after 30 s; Probe reports not ready until they are")
        csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(store, args.wait_timeout), server)
    if args.role in ("node", "all"):
        from opensds_operator.api import NODE_TOPOLOGY_KEY

        from .connectors import DEFAULT_LOCAL_ROOTS
        from .node import NodeService

        if not args.node_id:
            raise SystemExit("--node-id (or $NODE_NAME) is required for the node role")
        if not valid_node_name(args.node_id):  # it becomes this node's NQN/IQN and configfs names
            raise SystemExit(f"--node-id {args.node_id!r} is not a Kubernetes node name (DNS-1123 subdomain)")
        topology = {NODE_TOPOLOGY_KEY: args.node_id, **_topology(args.topology)}
        csi_pb2_grpc.add_NodeServicer_to_server(
            NodeService(args.node_id, topology, args.state_dir, args.max_volumes,
                        local_roots=args.local_root or list(DEFAULT_LOCAL_ROOTS)), server)
    ready = (lambda: store.synced) if args.role != "node" else (lambda: True)
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(ready, controller=args.role != "node"), server)
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opensds-csi", description=__doc__)
    parser.add_argument("--role", choices=["controller", "node", "all"], required=True,
                        help="all: both services in one process (single-node setups; what csi-sanity expects)")
    parser.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"))
    parser.add_argument("--workers", type=int, default=64,
                        help="gRPC worker threads; controller calls mostly wait on the API, so many are cheap")
    parser.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "opensds-system"),
                        help="controller: namespace of the Volume/Snapshot CRs it creates")
    parser.add_argument("--wait-timeout", type=float, default=60.0,
                        help="controller: longest wait for a CR to reach its state within one call")
    parser.add_argument("--node-id", default=os.environ.get("NODE_NAME", ""), help="node: this node's name")
    parser.add_argument("--state-dir", default="/var/lib/opensds/csi", help="node: where staging state is kept")
    parser.add_argument("--max-volumes", type=int, default=0, help="node: volumes per node (0: no limit)")
    parser.add_argument("--topology", action="append", default=[], metavar="KEY=VALUE",
                        help="node: extra topology labels this node reports (e.g. a zone)")
    parser.add_argument("--local-root", action="append", default=[], metavar="DIR",
                        help="node, repeatable: where `local` volumes may live: file backend directories (images "
                             "vol-<uid>.img below them) and /dev/<vg> of LVM backends (or /dev for every VG); "
                             "default /var/lib/opensds. publish_context paths elsewhere are refused")
    parser.add_argument("--registration-dir", default="",
                        help="node: kubelet's plugin registration directory (e.g. /var/lib/kubelet/plugins_registry "
                             "as mounted in the container); the plugin registers itself there")
    parser.add_argument("--kubelet-registration-path", default="",
                        help="node: the CSI socket's path as kubelet sees it on the host "
                             f"(e.g. /var/lib/kubelet/plugins/{DRIVER_NAME}/csi.sock); default: --endpoint's path")
    parser.add_argument("--health-address", default="",
                        help="HOST:PORT serving GET /healthz (Probe through the CSI socket, plus the node's "
                             "registration); empty: none")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build(args)
    server.start()
    log.info("%s plugin serving on %s", args.role, args.endpoint)
    checks: list[health.Check] = [health.probe_check(args.endpoint)]
    registrar = None
    if args.registration_dir and args.role in ("node", "all"):
        kubelet_path = args.kubelet_registration_path or args.endpoint.removeprefix("unix://")
        registrar = Registrar(DRIVER_NAME, args.registration_dir, kubelet_path)
        registrar.start()
        checks.append(registrar.healthy)
        threading.Thread(target=registrar.keep_registered, args=(threading.Event(),), name="registration",
                         daemon=True).start()
    if args.health_address:
        health.serve(args.health_address, checks)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        if registrar is not None:
            registrar.stop()  # kubelet deregisters the driver when the socket goes
        server.stop(5)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    server.wait_for_termination()
