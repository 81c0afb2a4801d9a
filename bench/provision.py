#!/usr/bin/env python3
"""Benchmark (not a test): N PVCs to Bound through external-provisioner, ours vs csi-driver-host-path.

Both runs use the same control plane, the same pinned external-provisioner binary and the
same flags (hack/sidecars.txt), the same WaitForFirstConsumer StorageClass shape with the
`selected-node` annotation set at creation (kube-scheduler's part), and the same number of
client threads. Per PVC the latency is creation -> Bound as seen by one watch.

ours:     operator + dock (file backend) + CSI controller (`--role controller`)
hostpath: bin/hostpathplugin (controller and node in one process, --enable-topology)

    hack/cluster.sh up && .venv/bin/python bench/provision.py [-n 200] [--clients 8]

bin/hostpathplugin must exist (README: how it was built); without it only ours is measured.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parent.parent
KUBECONFIG = ROOT / ".cluster" / "admin.kubeconfig"
G, V = "opensds.io", "v1alpha1"
NODE = "bench-node"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def provisioner_flags() -> list[str]:
    for line in (ROOT / "hack" / "sidecars.txt").read_text().splitlines():
        if line.startswith("csi-provisioner:"):
            return line.partition(":")[2].split()
    raise SystemExit("csi-provisioner flags missing from hack/sidecars.txt")


@dataclass
class Result:
    name: str
    latencies: list[float]
    total: float
    deleted_in: float


class Bench:
    def __init__(self, n: int, clients: int, size: str) -> None:
        self.n, self.clients, self.size = n, clients, size
        self.api = config.new_client_from_config(config_file=str(KUBECONFIG))
        self.core, self.storage = client.CoreV1Api(self.api), client.StorageV1Api(self.api)
        self.crs = client.CustomObjectsApi(self.api)
        self.env = {**os.environ, "KUBECONFIG": str(KUBECONFIG), "NAMESPACE": "opensds-system",
                    "POD_NAME": "bench-provisioner"}
        self.workdir = Path(tempfile.mkdtemp(prefix="opensds-provision-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: list[str]) -> None:
        with open(self.workdir / f"{name}.log", "ab") as log:
            self.procs.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def unregister_node(self) -> None:
        for delete in (self.storage.delete_csi_node, self.core.delete_node):
            with contextlib.suppress(client.exceptions.ApiException):
                delete(NODE)

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def register_node(self, driver: str, topology_key: str) -> None:
        labels = {"kubernetes.io/hostname": NODE, topology_key: NODE}
        try:
            self.core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=NODE, labels=labels)))
        except client.exceptions.ApiException as e:
            if e.status != 409:
                raise
            self.core.patch_node(NODE, {"metadata": {"labels": labels}})
        try:
            node = self.storage.read_csi_node(NODE)
            drivers = [d for d in node.spec.drivers or [] if d.name != driver]
            self.storage.delete_csi_node(NODE)
        except client.exceptions.ApiException:
            drivers = []
        drivers.append(client.V1CSINodeDriver(name=driver, node_id=NODE, topology_keys=[topology_key]))
        self.storage.create_csi_node(client.V1CSINode(metadata=client.V1ObjectMeta(name=NODE),
                                                      spec=client.V1CSINodeSpec(drivers=drivers)))

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}; logs in {self.workdir}")
            time.sleep(0.2)

    # ------------------------------------------------------------ drivers

    def start_ours(self, tag: str) -> str:
        venv_bin = Path(sys.executable).parent
        backend, profile = f"bench-{tag}", f"bench-{tag}"
        self.crs.create_cluster_custom_object(G, V, "storagebackends", {
            "apiVersion": f"{G}/{V}", "kind": "StorageBackend", "metadata": {"name": backend},
            "spec": {"driver": "file", "nodeName": NODE, "maxOverSubscriptionRatio": 100,
                     "parameters": {"path": str(self.workdir / "ours"), "capacity": "1Ti"}}})
        self.crs.create_cluster_custom_object(G, V, "storageprofiles", {
            "apiVersion": f"{G}/{V}", "kind": "StorageProfile", "metadata": {"name": profile},
            "spec": {"storageType": "block", "accessProtocol": "local", "provisioning": {"type": "thin"}}})
        self.register_node("block.csi.opensds.io", "topology.block.csi.opensds.io/node")
        self.spawn("operator", [str(venv_bin / "opensds-operator")])
        self.spawn("dock", [str(venv_bin / "opensds-dock"), "--backend", backend])
        socket = self.workdir / "ours.sock"
        self.spawn("ours", [str(venv_bin / "opensds-csi"), "--role", "controller", "--namespace", "opensds-system",
                            "--endpoint", f"unix://{socket}"])
        self.wait(lambda: self._storage_class_exists(profile), 60, "our StorageClass")
        self.wait(socket.exists, 60, "our CSI socket")
        self.spawn("provisioner-ours", [str(ROOT / "bin" / "csi-provisioner"), f"--csi-address={socket}",
                                        f"--kubeconfig={KUBECONFIG}", *provisioner_flags()])
        return profile

    def start_hostpath(self, tag: str) -> str:
        driver, sc = "hostpath.csi.k8s.io", f"hostpath-{tag}"
        self.register_node(driver, "topology.hostpath.csi/node")
        self.storage.create_storage_class(client.V1StorageClass(
            metadata=client.V1ObjectMeta(name=sc), provisioner=driver, volume_binding_mode="WaitForFirstConsumer",
            reclaim_policy="Delete", allow_volume_expansion=True))
        socket = self.workdir / "hostpath.sock"
        self.spawn("hostpath", [str(ROOT / "bin" / "hostpathplugin"), f"--endpoint=unix://{socket}",
                                f"--nodeid={NODE}", "--enable-topology", f"--drivername={driver}",
                                f"--statedir={self.workdir / 'hostpath'}", "--capacity=fast=1Ti",
                                "--enable-attach"])
        self.wait(socket.exists, 60, "hostpath socket")
        self.spawn("provisioner-hostpath", [str(ROOT / "bin" / "csi-provisioner"), f"--csi-address={socket}",
                                            f"--kubeconfig={KUBECONFIG}", *provisioner_flags()])
        return sc

    def remove_ours(self, tag: str) -> None:
        """Delete the bench backend and profile while the operator still runs (it releases them)."""
        for plural in ("storageprofiles", "storagebackends"):
            self.crs.delete_cluster_custom_object(G, V, plural, f"bench-{tag}")

        def gone() -> bool:
            try:
                self.crs.get_cluster_custom_object(G, V, "storagebackends", f"bench-{tag}")
            except client.exceptions.ApiException:
                return True
            return False
        self.wait(gone, 60, "bench backend released")

    def _storage_class_exists(self, name: str) -> bool:
        try:
            self.storage.read_storage_class(name)
        except client.exceptions.ApiException:
            return False
        return True

    # ------------------------------------------------------------ the measurement

    def run(self, name: str, storage_class: str) -> Result:
        ns = f"bench-{name}-{uuid.uuid4().hex[:5]}"
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        created: dict[str, float] = {}
        bound: dict[str, float] = {}
        done = threading.Event()
        stream = watch.Watch()

        def follow() -> None:
            for event in stream.stream(self.core.list_namespaced_persistent_volume_claim, ns, timeout_seconds=900):
                pvc = event["object"]
                if pvc.status.phase == "Bound" and pvc.metadata.name not in bound:
                    bound[pvc.metadata.name] = time.monotonic()
                    if len(bound) == self.n:
                        done.set()
                        stream.stop()

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        time.sleep(0.5)  # the watch is open before the first create

        def create(i: int) -> None:
            pvc_name = f"pvc-{i:04d}"
            created[pvc_name] = time.monotonic()
            self.core.create_namespaced_persistent_volume_claim(ns, {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": pvc_name, "annotations": {"volume.kubernetes.io/selected-node": NODE}},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": storage_class,
                         "resources": {"requests": {"storage": self.size}}}})

        start = time.monotonic()
        with ThreadPoolExecutor(self.clients) as pool:
            list(pool.map(create, range(self.n)))
        if not done.wait(900):
            raise SystemExit(f"{name}: only {len(bound)} of {self.n} PVCs bound; logs in {self.workdir}")
        total = max(bound.values()) - start
        latencies = [bound[k] - created[k] for k in created]
        # clean up and time it: PVCs deleted -> their PVs (and backend objects) gone
        t0 = time.monotonic()
        self.core.delete_collection_namespaced_persistent_volume_claim(ns)
        self.wait(lambda: not [p for p in self.core.list_persistent_volume().items
                               if p.spec.claim_ref and p.spec.claim_ref.namespace == ns], 900, f"{name} PVs deleted")
        deleted_in = time.monotonic() - t0
        self.core.delete_namespace(ns)
        return Result(name, latencies, total, deleted_in)


def report(result: Result) -> None:
    lat = result.latencies
    print(f"{result.name:9s} {len(lat)} PVCs bound in {result.total:6.2f} s ({len(lat) / result.total:5.1f}/s); "
          f"per-PVC p50 {statistics.median(lat):5.2f} s, p95 {pct(lat, 0.95):5.2f} s, max {max(lat):5.2f} s; "
          f"all deleted in {result.deleted_in:5.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size", default="64Mi")
    args = parser.parse_args()
    bench = Bench(args.n, args.clients, args.size)
    tag = uuid.uuid4().hex[:6]
    print(f"provisioner flags: {' '.join(provisioner_flags())}; {args.n} PVCs of {args.size}, {args.clients} clients")
    results = []
    try:
        results.append(bench.run("ours", bench.start_ours(tag)))
        bench.remove_ours(tag)
    finally:
        bench.stop_all()
    report(results[0])
    if (ROOT / "bin" / "hostpathplugin").exists():
        try:
            results.append(bench.run("hostpath", bench.start_hostpath(tag)))
        finally:
            bench.stop_all()
        report(results[1])
        ours, hostpath = results
        print(f"ratio ours/hostpath: total {ours.total / hostpath.total:.2f}, "
              f"p50 {statistics.median(ours.latencies) / statistics.median(hostpath.latencies):.2f}, "
              f"p95 {pct(ours.latencies, 0.95) / pct(hostpath.latencies, 0.95):.2f}")
    else:
        print("bin/hostpathplugin not found: hostpath run skipped")
    bench.unregister_node()
    print(f"logs in {bench.workdir}")


if __name__ == "__main__":
    main()
