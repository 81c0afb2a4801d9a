"""PVCs through the real CSI sidecars, our controller and node plugins, operator and dock.

No kubelet runs here, so the test plays its parts: register_node() writes the Node and
CSINode that kubelet and node-driver-registrar would, the `selected-node` annotation stands
in for kube-scheduler (WaitForFirstConsumer), and the node plugin is driven over its socket
the way kubelet would after the attacher reported a VolumeAttachment attached.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from opensds_csi.proto import csi_pb2, csi_pb2_grpc

from .conftest import CSI_DRIVER, NODE, NODE_KEY, ZONE, ZONE_KEY, Cluster, Sidecars, Stack, wait_for
from .helpers import CRs

pytestmark = pytest.mark.usefixtures("loop_devices")  # root and loop devices, or a failure naming them

MIB = 1 << 20
SNAP_GROUP, SNAP_VERSION = "snapshot.storage.k8s.io", "v1"


class Kubelet:
    """Stages and publishes volumes through the node plugin like kubelet would."""

    def __init__(self, endpoint: str, workdir: Path) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.workdir = workdir

    def mount(self, volume_id: str, publish_context: dict[str, str]) -> Path:
        key = hashlib.sha256(volume_id.encode()).hexdigest()[:12]
        staging, target = self.workdir / f"staging-{key}", self.workdir / f"target-{key}"
        staging.mkdir(exist_ok=True)
        capability = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="xfs"),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
        self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, publish_context=publish_context, staging_target_path=str(staging),
            volume_capability=capability))
        self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, publish_context=publish_context, staging_target_path=str(staging),
            target_path=str(target), volume_capability=capability))
        return target

    def expand(self, volume_id: str, target: Path) -> int:
        response = self.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume_id, volume_path=str(target)))
        return int(response.capacity_bytes)

    def unmount(self, volume_id: str) -> None:
        key = hashlib.sha256(volume_id.encode()).hexdigest()[:12]
        self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=str(self.workdir / f"target-{key}")))
        self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(self.workdir / f"staging-{key}")))


@pytest.fixture
def kubelet(sidecars: Sidecars, tmp_path: Path) -> Iterator[Kubelet]:
    k = Kubelet(sidecars.plugin.node_endpoint, tmp_path)
    yield k
    k.channel.close()


def pvc(name: str, storage_class: str, size: str, data_source: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "storageClassName": storage_class,
                            "resources": {"requests": {"storage": size}}}
    if data_source:
        spec["dataSource"] = data_source
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "annotations": {"volume.kubernetes.io/selected-node": NODE}},
            "spec": spec}


def bound_pv(core: client.CoreV1Api, namespace: str, name: str, timeout: float = 90) -> client.V1PersistentVolume:
    claim = wait_for(lambda: (c := core.read_namespaced_persistent_volume_claim(name, namespace))
                     .status.phase == "Bound" and c, timeout, f"PVC {name} Bound")
    assert isinstance(claim, client.V1PersistentVolumeClaim)
    return core.read_persistent_volume(claim.spec.volume_name)


def attach(storage: client.StorageV1Api, pv: str) -> tuple[str, dict[str, str]]:
    """A VolumeAttachment as the attach/detach controller would create it; waits for the attacher."""
    name = f"csi-{hashlib.sha256(f'{pv}{CSI_DRIVER}{NODE}'.encode()).hexdigest()}"
    storage.create_volume_attachment(client.V1VolumeAttachment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1VolumeAttachmentSpec(attacher=CSI_DRIVER, node_name=NODE,
                                           source=client.V1VolumeAttachmentSource(persistent_volume_name=pv))))
    attached = wait_for(lambda: (va := storage.read_volume_attachment(name)).status and va.status.attached and va,
                        60, f"VolumeAttachment of {pv} attached")
    assert isinstance(attached, client.V1VolumeAttachment)
    return name, dict(attached.status.attachment_metadata or {})


def capacity_of(storage: client.StorageV1Api, storage_class: str) -> dict[tuple[tuple[str, str], ...], set[str]]:
    """Topology segment of our node -> the capacities published for it (external-provisioner can
    briefly hold two objects for one segment after it starts; they carry the same value)."""
    found: dict[tuple[tuple[str, str], ...], set[str]] = {}
    for c in storage.list_namespaced_csi_storage_capacity("opensds-system").items:
        if c.storage_class_name == storage_class and (c.node_topology.match_labels or {}).get(NODE_KEY) == NODE:
            segment = tuple(sorted((c.node_topology.match_labels or {}).items()))
            found.setdefault(segment, set()).add(c.capacity)
    return found


def pool_room(cluster: Cluster, backend: str) -> tuple[int, int]:
    """(what the pool can still provision, what it has provisioned), from the dock's report."""
    obj = CRs(cluster.api).get("storagebackends", backend)
    pool = obj["status"]["pools"][0]
    ratio = float(obj["spec"].get("maxOverSubscriptionRatio", 1))
    return int(pool["totalBytes"] * ratio) - int(pool["provisionedBytes"]), int(pool["provisionedBytes"])


def capacity_matches_pool(storage: client.StorageV1Api, cluster: Cluster, storage_class: str, backend: str,
                          provisioned_at_least: int = 0) -> bool:
    published = single_capacity(storage, storage_class)
    room, provisioned = pool_room(cluster, backend)
    return published is not None and parse_quantity(published) == room and provisioned >= provisioned_at_least


def single_capacity(storage: client.StorageV1Api, storage_class: str) -> str | None:
    values = list(capacity_of(storage, storage_class).values())
    return next(iter(values[0])) if len(values) == 1 and len(values[0]) == 1 else None


def volume_cr(cluster: Cluster, volume_handle: str) -> dict[str, Any]:
    namespace, name = volume_handle.split("/")
    return CRs(cluster.api, namespace).get("volumes", name)


def test_pvcs_bind_attach_resize_snapshot_restore_clone_and_clean_up(
        sidecars: Sidecars, stack: Stack, cluster: Cluster, namespace: str, kubelet: Kubelet) -> None:
    core, storage = client.CoreV1Api(cluster.api), client.StorageV1Api(cluster.api)
    custom = client.CustomObjectsApi(cluster.api)
    sc = sidecars.plugin.profile
    backend_dir = stack.backend_dir
    sc_obj = wait_for(lambda: storage.read_storage_class(sc), 30, f"StorageClass {sc}")
    assert isinstance(sc_obj, client.V1StorageClass) and sc_obj.volume_binding_mode == "WaitForFirstConsumer"

    # CSIStorageCapacity per topology segment (the node's segment, from CSINode + Node labels)
    wait_for(lambda: single_capacity(storage, sc), 60, "CSIStorageCapacity for the class")
    capacities = capacity_of(storage, sc)
    segment = dict(next(iter(capacities)))
    assert segment == {NODE_KEY: NODE, ZONE_KEY: ZONE}
    # Other tests share the pool: the published capacity must equal what the pool reports
    wait_for(lambda: capacity_matches_pool(storage, cluster, sc, stack.backend), 30, "capacity == pool's room")
    print(f"CSIStorageCapacity before: {single_capacity(storage, sc)} for {segment}")

    # 1. a PVC binds; its Volume CR is Available with node affinity to the backend's node
    core.create_namespaced_persistent_volume_claim(namespace, pvc("data", sc, "512Mi"))
    pv = bound_pv(core, namespace, "data")
    assert pv.spec.csi.driver == CSI_DRIVER
    volume = volume_cr(cluster, pv.spec.csi.volume_handle)
    assert volume["status"]["phase"] == "Available"
    terms = pv.spec.node_affinity.required.node_selector_terms
    assert {e.key: e.values for e in terms[0].match_expressions}[NODE_KEY] == [NODE]
    assert volume["metadata"]["annotations"]["opensds.io/pvc"] == f"{namespace}/data"

    # 2. a VolumeAttachment becomes attached; the node mounts the volume and writes data
    va, context = attach(storage, pv.metadata.name)
    assert context["transport"] == "local" and context["path"].endswith(".img")
    target = kubelet.mount(pv.spec.csi.volume_handle, context)
    payload = os.urandom(3 * MIB)
    (target / "payload.bin").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()

    # 3. resize: PVC grows -> Volume CR and backing file grow; the node grows the filesystem online
    #    (xfs: this sandbox withholds CAP_SYS_RESOURCE, which ext4's online resize requires)
    core.patch_namespaced_persistent_volume_claim("data", namespace, {
        "spec": {"resources": {"requests": {"storage": "640Mi"}}}})
    wait_for(lambda: volume_cr(cluster, pv.spec.csi.volume_handle)["status"].get("capacityBytes") == 640 * MIB,
             60, "Volume CR at 128Mi")
    wait_for(lambda: core.read_persistent_volume(pv.metadata.name).spec.capacity["storage"] == "640Mi", 60,
             "PV capacity 128Mi")
    assert Path(context["path"]).stat().st_size == 640 * MIB
    size_before = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    assert kubelet.expand(pv.spec.csi.volume_handle, target) == 640 * MIB
    grown = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize - size_before
    assert grown == 128 * MIB, f"filesystem grew by {grown} bytes"
    kubelet.unmount(pv.spec.csi.volume_handle)

    # 4. a VolumeSnapshot becomes readyToUse
    custom.create_namespaced_custom_object(SNAP_GROUP, SNAP_VERSION, namespace, "volumesnapshots", {
        "apiVersion": f"{SNAP_GROUP}/{SNAP_VERSION}", "kind": "VolumeSnapshot", "metadata": {"name": "snap"},
        "spec": {"volumeSnapshotClassName": sc, "source": {"persistentVolumeClaimName": "data"}}})
    wait_for(lambda: (custom.get_namespaced_custom_object(SNAP_GROUP, SNAP_VERSION, namespace, "volumesnapshots",
                                                          "snap").get("status") or {}).get("readyToUse"),
             60, "VolumeSnapshot readyToUse")

    # 5. a restore from the snapshot and a clone of the PVC bind and hold identical data
    core.create_namespaced_persistent_volume_claim(namespace, pvc(
        "restored", sc, "640Mi", {"apiGroup": SNAP_GROUP, "kind": "VolumeSnapshot", "name": "snap"}))
    core.create_namespaced_persistent_volume_claim(namespace, pvc(
        "cloned", sc, "640Mi", {"kind": "PersistentVolumeClaim", "name": "data"}))
    attachments = [va]
    for name in ("restored", "cloned"):
        copy = bound_pv(core, namespace, name)
        va_name, ctx = attach(storage, copy.metadata.name)
        attachments.append(va_name)
        mounted = kubelet.mount(copy.spec.csi.volume_handle, ctx)
        assert hashlib.sha256((mounted / "payload.bin").read_bytes()).hexdigest() == digest, name
        kubelet.unmount(copy.spec.csi.volume_handle)

    # 6. CSIStorageCapacity follows pool usage (3 volumes of 640Mi now provisioned)
    wait_for(lambda: capacity_matches_pool(storage, cluster, sc, stack.backend, 3 * 640 * MIB), 30,
             "capacity to follow the pool with the 3 volumes in it")
    print(f"CSIStorageCapacity after 3 x 640Mi: {single_capacity(storage, sc)}")

    # 7. deleting everything leaves no backing file behind
    uids = [volume_cr(cluster, core.read_persistent_volume(c.spec.volume_name).spec.csi.volume_handle)
            ["metadata"]["uid"] for c in core.list_namespaced_persistent_volume_claim(namespace).items]
    snap = custom.get_namespaced_custom_object(SNAP_GROUP, SNAP_VERSION, namespace, "volumesnapshots", "snap")
    content = custom.get_cluster_custom_object(SNAP_GROUP, SNAP_VERSION, "volumesnapshotcontents",
                                               snap["status"]["boundVolumeSnapshotContentName"])
    snap_ns, snap_name = content["status"]["snapshotHandle"].split("/")
    uids.append(CRs(cluster.api, snap_ns).get("snapshots", snap_name)["metadata"]["uid"])
    for name in attachments:
        storage.delete_volume_attachment(name)
    for name in attachments:
        wait_for(lambda n=name: not _exists(lambda: storage.read_volume_attachment(n)), 60, f"{name} detached")
    custom.delete_namespaced_custom_object(SNAP_GROUP, SNAP_VERSION, namespace, "volumesnapshots", "snap")
    for name in ("data", "restored", "cloned"):
        core.delete_namespaced_persistent_volume_claim(name, namespace)
    wait_for(lambda: not [p for p in core.list_persistent_volume().items
                          if p.spec.claim_ref and p.spec.claim_ref.namespace == namespace], 90, "PVs deleted")
    wait_for(lambda: not [f for f in backend_dir.iterdir() if any(uid in f.name for uid in uids)], 60,
             "backing files of the volumes and the snapshot deleted")
    wait_for(lambda: capacity_matches_pool(storage, cluster, sc, stack.backend), 30, "capacity to follow the pool")


def _exists(read: Any) -> bool:
    try:
        read()
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def parse_quantity(value: str) -> int:
    from opensds_operator.quantity import parse_bytes
    return parse_bytes(value)
