"""A Ceph RBD backend through the real operator and dock, attached with krbd by the node plugin.

Ceph runs inside the VM; the API is the host's kube-apiserver. The dock reads its cephx key
from the Secret in StorageBackend.spec.secretRef; the node plugin gets the key the way kubelet
would hand it over: from the Secret the profile's StorageClass names as node-stage secret.
"""
from __future__ import annotations

import base64
import hashlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config

from opensds_csi.connectors.rbd import mapped_device
from opensds_csi.iolimits import POD_UID_KEY
from opensds_csi.proto import csi_pb2
from opensds_operator.drivers.rbd import RbdDriver

from .kernel import pod_cgroup
from .nodeplugin import Node, capability, stage, unstage
from .stack import KUBECONFIG, G, MiB, Stack, V, running_stack, wait

pytestmark = pytest.mark.skipif(not KUBECONFIG.exists(), reason="needs OPENSDS_VM_APISERVER (make e2e sets it)")
POOL = "opensds"


@pytest.fixture
def stack(ceph: tuple[str, str]) -> Iterator[Stack]:
    conf, key = ceph
    with running_stack("ceph", lambda ns: {
            "driver": "ceph", "secretRef": {"name": "cephx", "namespace": ns},
            "parameters": {"conf": conf, "pool": POOL, "user": "opensds"}},
            secrets={"cephx": {"key": key, "userID": "opensds", "userKey": key}}) as stack:
        yield stack


def test_rbd_volume_through_the_dock_maps_with_krbd_grows_snapshots_and_leaves_nothing(
        stack: Stack, ceph: tuple[str, str]) -> None:
    crs, ns = stack.crs, stack.ns
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(KUBECONFIG)))
    storage = client.StorageV1Api(config.new_client_from_config(config_file=str(KUBECONFIG)))

    def get(plural: str, name: str) -> dict[str, Any]:
        return crs.get_namespaced_custom_object(G, V, ns, plural, name)  # type: ignore[no-any-return]

    def create(plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        crs.create_namespaced_custom_object(
            G, V, ns, plural, {"apiVersion": f"{G}/{V}", "kind": kind, "metadata": {"name": name}, "spec": spec})

    def status(plural: str, name: str) -> dict[str, Any]:
        return get(plural, name).get("status") or {}

    wait(lambda: (crs.get_cluster_custom_object(G, V, "storagebackends", stack.backend).get("status") or {})
         .get("pools"), 120, "backend pools")
    profile = f"rbd-{uuid.uuid4().hex[:6]}"
    crs.create_cluster_custom_object(G, V, "storageprofiles", {
        "apiVersion": f"{G}/{V}", "kind": "StorageProfile", "metadata": {"name": profile},
        "spec": {"storageType": "block", "accessProtocol": "rbd", "fsType": "xfs",
                 "provisioning": {"iopsPerGiB": 2000, "maxBWS": 50 * MiB},
                 "nodeStageSecretRef": {"name": "cephx", "namespace": ns}}})
    node = Node("node-a")
    try:
        sc = wait(lambda: _storage_class(storage, profile), 60, "StorageClass")
        prefix = "csi.storage.k8s.io/node-stage-secret"
        secret = core.read_namespaced_secret(sc.parameters[f"{prefix}-name"], sc.parameters[f"{prefix}-namespace"])
        secrets = {k: base64.b64decode(v).decode() for k, v in secret.data.items() if k in ("userID", "userKey")}

        create("volumes", "Volume", "data", {"size": "320Mi", "profile": profile})
        wait(lambda: status("volumes", "data").get("phase") == "Available", 180, "Volume Available")
        image = f"vol-{get('volumes', 'data')['metadata']['uid']}"
        crs.patch_namespaced_custom_object(G, V, ns, "volumes", "data", {"spec": {"publishedNodes": ["node-a"]}})
        context = wait(lambda: status("volumes", "data").get("publishContext"), 120, "publishContext")
        assert context["transport"] == "rbd" and context["image"] == image and context["pool"] == POOL
        assert context["maxIOPS"] == "2000" and context["maxBPS"] == str(50 * MiB)  # 2000/GiB x 1 GiB (rounded up)
        assert "userKey" not in context and ceph[1] not in str(context)

        pod = "1f0c3a52-8d0e-4c55-a3f1-2b9e8c7d6a10"
        cgroup = pod_cgroup(pod)
        target = stage(node, f"{ns}/data", context, capability("xfs"), volume_context={POD_UID_KEY: pod},
                       secrets=secrets)
        device = mapped_device(POOL, image)
        assert device is not None
        rdev = os.stat(device).st_rdev
        assert f"{os.major(rdev)}:{os.minor(rdev)} rbps={50 * MiB} wbps={50 * MiB} riops=2000 wiops=2000" in (
            cgroup / "io.max").read_text()
        payload = os.urandom(2 * MiB)
        (target / "payload").write_bytes(payload)

        crs.patch_namespaced_custom_object(G, V, ns, "volumes", "data", {"spec": {"size": "448Mi"}})
        wait(lambda: status("volumes", "data").get("capacityBytes") == 448 * MiB, 180, "expanded")
        grown = node.stub.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=f"{ns}/data", volume_path=str(target)))
        assert grown.capacity_bytes == 448 * MiB
        unstage(node, f"{ns}/data")
        assert mapped_device(POOL, image) is None
        assert "riops" not in (cgroup / "io.max").read_text()  # lifted on unpublish

        create("snapshots", "Snapshot", "snap", {"volumeName": "data"})
        wait(lambda: status("snapshots", "snap").get("readyToUse"), 180, "Snapshot ready")
        create("volumes", "Volume", "restored",
               {"size": "448Mi", "profile": profile, "source": {"kind": "Snapshot", "name": "snap"}})
        wait(lambda: status("volumes", "restored").get("phase") == "Available", 180, "restored Available")
        crs.patch_namespaced_custom_object(G, V, ns, "volumes", "restored", {"spec": {"publishedNodes": ["node-a"]}})
        restored_context = wait(lambda: status("volumes", "restored").get("publishContext"), 120, "publishContext")
        target = stage(node, f"{ns}/restored", restored_context, capability("xfs"), secrets=secrets)
        assert hashlib.sha256((target / "payload").read_bytes()).digest() == hashlib.sha256(payload).digest()
        unstage(node, f"{ns}/restored")

        for name in ("restored", "data"):
            crs.patch_namespaced_custom_object(G, V, ns, "volumes", name, {"spec": {"publishedNodes": []}})
        for plural, name in (("volumes", "restored"), ("snapshots", "snap"), ("volumes", "data")):
            crs.delete_namespaced_custom_object(G, V, ns, plural, name)
        wait(lambda: not crs.list_namespaced_custom_object(G, V, ns, "volumes")["items"]
             and not crs.list_namespaced_custom_object(G, V, ns, "snapshots")["items"], 180, "CRs gone")
        conf, key = ceph
        left = RbdDriver(conf, POOL, "opensds", key=key).list_objects(POOL)
        assert not [o for o in left if o.startswith(image[:12]) or "restored" in o], left
        cgroup.rmdir()
    finally:
        node.close()
        crs.delete_cluster_custom_object(G, V, "storageprofiles", profile)


def _storage_class(storage: client.StorageV1Api, name: str) -> Any:
    try:
        return storage.read_storage_class(name)
    except client.ApiException:
        return None

