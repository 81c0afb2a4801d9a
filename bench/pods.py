#!/usr/bin/env python3
"""Benchmark (not a test): N pods, each with its own new PVC, from creation to Running.

Runs against a system `make up` brought up (real kubelet node, the chart installed from the local
images): every pod goes through kube-scheduler, external-provisioner (WaitForFirstConsumer), the
operator and dock, external-attacher, kubelet and the node plugin (NodeStage/NodePublish), so the
figure is what a user waits for. Per pod the latency is PVC+pod creation -> pod Running with its
container ready, seen by one watch. Reports p50/p95/max and the whole run, then deletes everything
and reports how long it took until every PV was gone.

    make up && .venv/bin/python bench/pods.py [-n 50] [--clients 8] [--hostpath bin/hostpathplugin]

With --hostpath (a csi-driver-host-path binary; `make tools` cannot build it: the module proxy
refuses it), the same run follows on csi-driver-host-path deployed on the same node: its plugin
(controller and node in one process) in our image with the binary mounted from the host, beside
the very sidecar containers of our CSI controller Deployment (same images, flags, ServiceAccount),
registered with kubelet by `python -m opensds_csi.registration`; and the ratio is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client, config, watch
from provision import pct  # bench/ is the script's directory: one percentile for every benchmark

ROOT = Path(__file__).resolve().parent.parent
KUBECONFIG = Path(os.environ.get("OPENSDS_CLUSTER_DIR", ROOT / ".cluster")) / "admin.kubeconfig"


def manifests(i: int, storage_class: str, size: str, image: str) -> tuple[client.V1PersistentVolumeClaim, client.V1Pod]:
    name = f"bench-{i:04d}"
    pvc = client.V1PersistentVolumeClaim(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteOnce"], storage_class_name=storage_class,
            resources=client.V1VolumeResourceRequirements(requests={"storage": size})))
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            termination_grace_period_seconds=0,
            containers=[client.V1Container(
                name="app", image=image, image_pull_policy="IfNotPresent",
                command=["sh", "-c", "echo ready > /data/ready && exec sleep 100000"],
                volume_mounts=[client.V1VolumeMount(name="data", mount_path="/data")])],
            volumes=[client.V1Volume(name="data", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                claim_name=name))]))
    return pvc, pod


HOSTPATH = "hostpath.csi.k8s.io"
HOSTPATH_SOCKET_DIR = "/var/lib/kubelet/plugins/csi-hostpath"


def hostpath_deployment(api: client.ApiClient, binary: Path, node: str) -> dict:  # type: ignore[type-arg]
    """csi-driver-host-path beside copies of our controller's sidecar containers."""
    ours = client.AppsV1Api(api).read_namespaced_deployment("opensds-csi-controller", "opensds-system")
    plugin_image = ours.spec.template.spec.containers[0].image
    sidecars = [api.sanitize_for_serialization(c) for c in ours.spec.template.spec.containers[1:]]
    host_path = lambda path, kind="Directory": {"path": path, "type": kind}  # noqa: E731
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "bench-hostpath", "namespace": "opensds-system"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "bench-hostpath"}}, "template": {
            "metadata": {"labels": {"app": "bench-hostpath"}},
            "spec": {
                "serviceAccountName": ours.spec.template.spec.service_account_name,
                "nodeSelector": {"kubernetes.io/hostname": node},
                "containers": [
                    {"name": "hostpath", "image": plugin_image, "imagePullPolicy": "IfNotPresent",
                     "command": ["/hostpath-bin/" + binary.name, f"--drivername={HOSTPATH}",
                                 "--endpoint=unix:///csi/csi.sock", "--nodeid=$(NODE_NAME)",
                                 "--enable-attach=true", "--statedir=/csi-data-dir"],
                     "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                     "securityContext": {"privileged": True},
                     "volumeMounts": [
                         {"name": "socket-dir", "mountPath": "/csi"},
                         {"name": "kubelet", "mountPath": "/var/lib/kubelet", "mountPropagation": "Bidirectional"},
                         {"name": "data", "mountPath": "/csi-data-dir"},
                         {"name": "dev", "mountPath": "/dev"},
                         {"name": "bin", "mountPath": "/hostpath-bin", "readOnly": True}]},
                    {"name": "registrar", "image": plugin_image, "imagePullPolicy": "IfNotPresent",
                     "command": ["python3", "-m", "opensds_csi.registration", f"--driver-name={HOSTPATH}",
                                 "--registration-dir=/registration",
                                 f"--kubelet-registration-path={HOSTPATH_SOCKET_DIR}/csi.sock"],
                     "volumeMounts": [{"name": "registration", "mountPath": "/registration"}]},
                    *sidecars],
                "volumes": [
                    {"name": "socket-dir", "hostPath": host_path(HOSTPATH_SOCKET_DIR, "DirectoryOrCreate")},
                    {"name": "registration", "hostPath": host_path("/var/lib/kubelet/plugins_registry")},
                    {"name": "kubelet", "hostPath": host_path("/var/lib/kubelet")},
                    {"name": "data", "hostPath": host_path("/var/lib/csi-hostpath-data", "DirectoryOrCreate")},
                    {"name": "dev", "hostPath": host_path("/dev")},
                    {"name": "bin", "hostPath": host_path(str(binary.resolve().parent))}]}}}}


def deploy_hostpath(api: client.ApiClient, binary: Path, node: str, timeout: float) -> str:
    """Deploy csi-driver-host-path and its StorageClass; wait until kubelet registered it."""
    storage, apps = client.StorageV1Api(api), client.AppsV1Api(api)
    storage.create_csi_driver({"apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": {"name": HOSTPATH},
                               "spec": {"attachRequired": True, "podInfoOnMount": True, "storageCapacity": True,
                                        "fsGroupPolicy": "File", "volumeLifecycleModes": ["Persistent"]}})
    storage.create_storage_class({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                                  "metadata": {"name": "bench-hostpath"}, "provisioner": HOSTPATH,
                                  "volumeBindingMode": "WaitForFirstConsumer", "allowVolumeExpansion": True})
    apps.create_namespaced_deployment("opensds-system", hostpath_deployment(api, binary, node))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        drivers = storage.read_csi_node(node).spec.drivers or []
        if any(d.name == HOSTPATH for d in drivers):
            return "bench-hostpath"
        time.sleep(1)
    raise SystemExit(f"{HOSTPATH} did not register with kubelet on {node} within {timeout:.0f} s")


def remove_hostpath(api: client.ApiClient) -> None:
    client.AppsV1Api(api).delete_namespaced_deployment("bench-hostpath", "opensds-system")
    client.StorageV1Api(api).delete_storage_class("bench-hostpath")
    client.StorageV1Api(api).delete_csi_driver(HOSTPATH)


def run(api: client.ApiClient, n: int, clients: int, storage_class: str, size: str, image: str,
        timeout: float) -> tuple[int, float]:
    core = client.CoreV1Api(api)
    ns = f"bench-pods-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    created: dict[str, float] = {}
    running: dict[str, float] = {}
    done = threading.Event()

    def watch_pods() -> None:
        w = watch.Watch()
        for event in w.stream(core.list_namespaced_pod, ns, timeout_seconds=int(timeout) + 60):
            pod = event["object"]
            name = pod.metadata.name
            statuses = pod.status.container_statuses or []
            if name not in running and pod.status.phase == "Running" and statuses and all(s.ready for s in statuses):
                running[name] = time.monotonic()
                if len(running) == n:
                    w.stop()
        done.set()

    watcher = threading.Thread(target=watch_pods, daemon=True)
    watcher.start()
    time.sleep(0.5)  # the watch is open before the first create

    def create(i: int) -> None:
        pvc, pod = manifests(i, storage_class, size, image)
        created[pod.metadata.name] = time.monotonic()
        core.create_namespaced_persistent_volume_claim(ns, pvc)
        core.create_namespaced_pod(ns, pod)

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(create, range(n)))
    done.wait(timeout)
    total = time.monotonic() - start
    latencies = [running[name] - created[name] for name in running]
    print(f"pods: {len(running)}/{n} Running with their PVCs (class {storage_class}, {size} each, {clients} clients)")
    if latencies:
        print(f"create -> Running: p50 {statistics.median(latencies):.2f} s, p95 {pct(latencies, 0.95):.2f} s, "
              f"max {max(latencies):.2f} s; whole run {total:.1f} s")
    # Clean up: pods first (unmount, detach), then the claims; time until every PV is gone.
    t0 = time.monotonic()
    core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
    core.delete_collection_namespaced_persistent_volume_claim(ns)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        left = [pv for pv in core.list_persistent_volume().items
                if pv.spec.claim_ref is not None and pv.spec.claim_ref.namespace == ns]
        if not left:
            break
        time.sleep(1)
    print(f"cleanup: every PV gone {time.monotonic() - t0:.1f} s after deletion")
    core.delete_namespace(ns)
    return (0 if len(running) == n else 1), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--storage-class", default="local-thin")
    parser.add_argument("--size", default="512Mi", help="thin: costs no space; xfs needs 300 MiB")
    parser.add_argument("--image", default="opensds/busybox:1.35.0")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--kubeconfig", default=str(KUBECONFIG))
    parser.add_argument("--hostpath", type=Path, help="a hostpathplugin binary: also run on csi-driver-host-path")
    parser.add_argument("--node", default="node-1", help="--hostpath: the node to deploy it on")
    args = parser.parse_args()
    api = config.new_client_from_config(config_file=args.kubeconfig)
    print(f"== ours ({args.storage_class})")
    rc, ours = run(api, args.n, args.clients, args.storage_class, args.size, args.image, args.timeout)
    if args.hostpath is None:
        sys.exit(rc)
    print(f"== csi-driver-host-path ({args.hostpath}), same node, same sidecars")
    hostpath_class = deploy_hostpath(api, args.hostpath, args.node, args.timeout)
    try:
        rc2, theirs = run(api, args.n, args.clients, hostpath_class, args.size, args.image, args.timeout)
    finally:
        remove_hostpath(api)
    print(f"== whole run, ours / csi-driver-host-path: {ours:.1f} s / {theirs:.1f} s = {ours / theirs:.2f}")
    sys.exit(rc or rc2)


if __name__ == "__main__":
    main()
