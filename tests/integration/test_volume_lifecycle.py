"""Backend, profile, volume and snapshot lifecycle through the real operator and dock on the file backend."""
from __future__ import annotations

import base64
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from .conftest import LABELS, Cluster, Stack, wait_for
from .helpers import CRs, condition, events_for

MiB = 2**20


Profiles = Callable[..., str]


@pytest.fixture
def profiles(cluster: Cluster) -> Iterator[Profiles]:
    """Makes StorageProfiles for one test and deletes whatever is left of them afterwards."""
    crs, made = CRs(cluster.api), []

    def make(**spec: object) -> str:
        name = f"p-{uuid.uuid4().hex[:6]}"
        crs.create("storageprofiles", "StorageProfile", name,
                   {"storageType": "block", "accessProtocol": "local", **spec})
        made.append(name)
        return name

    yield make
    for name in made:
        crs.delete_if_present("storageprofiles", name)


def _phase(crs: CRs, name: str) -> str | None:
    return (crs.get("volumes", name).get("status") or {}).get("phase")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_backend_becomes_ready_with_pool_capacity(cluster: Cluster, stack: Stack) -> None:
    backend = CRs(cluster.api).get("storagebackends", stack.backend)
    [pool] = backend["status"]["pools"]
    assert pool["name"] == "default" and pool["totalBytes"] == 8 * 2**30
    assert pool["capabilities"]["snapshot"] and "local" in pool["capabilities"]["protocols"]
    assert condition(backend, "Ready")["status"] == "True"  # type: ignore[index]
    assert backend["status"]["lastProbeTime"]


def test_profile_keeps_storage_class_and_snapshot_class_in_sync(cluster: Cluster, stack: Stack,
                                                                profiles: Profiles) -> None:
    crs, storage = CRs(cluster.api), client.StorageV1Api(cluster.api)
    name = profiles()
    sc = wait_for(lambda: storage.read_storage_class(name), 30, "StorageClass")
    assert sc.provisioner == "block.csi.opensds.io"  # type: ignore[attr-defined]
    assert sc.volume_binding_mode == "WaitForFirstConsumer"  # type: ignore[attr-defined]
    assert sc.parameters["csi.storage.k8s.io/fstype"] == "ext4"  # type: ignore[attr-defined]
    snapshot_classes = client.CustomObjectsApi(cluster.api)
    vsc = snapshot_classes.get_cluster_custom_object("snapshot.storage.k8s.io", "v1", "volumesnapshotclasses", name)
    assert vsc["driver"] == "block.csi.opensds.io"

    crs.patch("storageprofiles", name, {"spec": {"fsType": "xfs", "allowVolumeExpansion": False}})
    wait_for(lambda: storage.read_storage_class(name).parameters["csi.storage.k8s.io/fstype"] == "xfs", 30,
             "StorageClass recreated with xfs")
    assert storage.read_storage_class(name).allow_volume_expansion is False

    crs.delete("storageprofiles", name)
    wait_for(lambda: name not in [s.metadata.name for s in storage.list_storage_class().items], 30, "SC removed")


def test_volume_snapshot_restore_expand_delete(cluster: Cluster, stack: Stack, namespace: str,
        profiles: Profiles) -> None:
    crs = CRs(cluster.api, namespace)
    profile = profiles()
    vol = crs.create("volumes", "Volume", "data", {"size": "64Mi", "profile": profile})
    wait_for(lambda: _phase(crs, "data") == "Available", 60, "Volume Available")
    data = crs.get("volumes", "data")
    backing = stack.backend_dir / "volumes" / f"vol-{vol['metadata']['uid']}.img"
    assert data["status"]["backendVolumeID"] == f"vol-{vol['metadata']['uid']}"
    assert (data["spec"]["backend"], data["spec"]["pool"]) == (stack.backend, "default")
    assert os.path.getsize(backing) == 64 * MiB == data["status"]["capacityBytes"]

    with open(backing, "r+b") as f:  # data a user wrote through the device
        f.seek(3 * MiB)
        f.write(os.urandom(2 * MiB))
    crs.patch("volumes", "data", {"spec": {"size": "128Mi"}})
    wait_for(lambda: crs.get("volumes", "data")["status"].get("capacityBytes") == 128 * MiB, 60, "expanded")
    assert os.path.getsize(backing) == 128 * MiB and _phase(crs, "data") == "Available"

    snap = crs.create("snapshots", "Snapshot", "snap", {"volumeName": "data"})
    wait_for(lambda: (crs.get("snapshots", "snap").get("status") or {}).get("readyToUse"), 60, "snapshot ready")
    snap_file = stack.backend_dir / "snapshots" / f"snap-{snap['metadata']['uid']}.img"
    assert crs.get("snapshots", "snap")["status"]["sizeBytes"] == 128 * MiB

    restored = crs.create("volumes", "Volume", "restored",
                          {"size": "128Mi", "profile": profile, "source": {"kind": "Snapshot", "name": "snap"}})
    wait_for(lambda: _phase(crs, "restored") == "Available", 60, "restored Available")
    restored_file = stack.backend_dir / "volumes" / f"vol-{restored['metadata']['uid']}.img"
    assert _sha(restored_file) == _sha(backing)

    clone = crs.create("volumes", "Volume", "clone",
                       {"size": "128Mi", "profile": profile, "source": {"kind": "Volume", "name": "data"}})
    wait_for(lambda: _phase(crs, "clone") == "Available", 60, "clone Available")
    assert _sha(stack.backend_dir / "volumes" / f"vol-{clone['metadata']['uid']}.img") == _sha(backing)

    for plural, name in (("volumes", "clone"), ("volumes", "restored"), ("snapshots", "snap"), ("volumes", "data")):
        crs.delete(plural, name)
    wait_for(lambda: not any(crs.exists(p, n) for p, n in (("volumes", "data"), ("volumes", "restored"),
                                                             ("volumes", "clone"), ("snapshots", "snap"))),
             60, "CRs gone")
    assert not backing.exists() and not snap_file.exists() and not restored_file.exists()


def test_unschedulable_volume_explains_each_pool(cluster: Cluster, stack: Stack, namespace: str,
        profiles: Profiles) -> None:
    crs = CRs(cluster.api, namespace)
    profile = profiles(customProperties={"tier": "gold"})
    crs.create("volumes", "Volume", "big", {"size": "1Ti", "profile": profile})
    cond = wait_for(lambda: condition(crs.get("volumes", "big"), "Scheduled"), 30, "Scheduled condition")
    assert cond["status"] == "False" and cond["reason"] == "Unschedulable"  # type: ignore[index]
    assert f"{stack.backend}/default: capability tier=gold required, pool has tier=<unset>" in cond["message"]  # type: ignore[index]
    assert _phase(crs, "big") == "Pending"
    assert any(e.startswith("Unschedulable: no pool fits 1Ti") for e in events_for(cluster.api, namespace, "big"))
    crs.delete("volumes", "big")


def test_too_large_volume_reports_capacity(cluster: Cluster, stack: Stack, namespace: str,
        profiles: Profiles) -> None:
    crs = CRs(cluster.api, namespace)
    profile = profiles()
    crs.create("volumes", "Volume", "huge", {"size": "1Ti", "profile": profile})
    cond = wait_for(lambda: condition(crs.get("volumes", "huge"), "Scheduled"), 30, "Scheduled condition")
    assert "exceeds the pool's max volume size 8Gi" in cond["message"]  # type: ignore[index]
    crs.delete("volumes", "huge")


def test_unknown_profile_is_reported(cluster: Cluster, stack: Stack, namespace: str,
        profiles: Profiles) -> None:
    crs = CRs(cluster.api, namespace)
    crs.create("volumes", "Volume", "orphan", {"size": "1Mi", "profile": "no-such-profile"})
    cond = wait_for(lambda: condition(crs.get("volumes", "orphan"), "Scheduled"), 30, "Scheduled condition")
    assert cond["reason"] == "ProfileNotFound"  # type: ignore[index]
    assert "StorageProfile no-such-profile does not exist" in cond["message"]  # type: ignore[index]


def test_source_in_another_namespace_is_refused(cluster: Cluster, stack: Stack, namespace: str,
        profiles: Profiles) -> None:
    crs = CRs(cluster.api, namespace)
    profile = profiles()
    crs.create("volumes", "Volume", "x", {"size": "1Mi", "profile": profile,
                                          "source": {"kind": "Snapshot", "name": "s", "namespace": "elsewhere"}})
    cond = wait_for(lambda: condition(crs.get("volumes", "x"), "Scheduled"), 30, "Scheduled condition")
    assert cond["reason"] == "CrossNamespaceSource"  # type: ignore[index]
    assert "only sources in " + namespace in cond["message"]  # type: ignore[index]


def test_profile_in_use_is_not_deleted_until_volumes_are(cluster: Cluster, stack: Stack, namespace: str,
        profiles: Profiles) -> None:
    crs = CRs(cluster.api, namespace)
    profile = profiles()
    crs.create("volumes", "Volume", "user", {"size": "1Mi", "profile": profile})
    wait_for(lambda: _phase(crs, "user") == "Available", 60, "Volume Available")
    crs.delete("storageprofiles", profile)
    cond = wait_for(lambda: condition(crs.get("storageprofiles", profile), "InUse"), 30, "InUse condition")
    assert f"still used by Volumes {namespace}/user; delete them first" in cond["message"]  # type: ignore[index]
    crs.delete("volumes", "user")
    wait_for(lambda: not crs.exists("storageprofiles", profile), 60, "profile deleted after its volume")


def test_backend_in_use_is_not_deleted(cluster: Cluster, stack: Stack, namespace: str,
        profiles: Profiles) -> None:
    crs = CRs(cluster.api, namespace)
    profile = profiles()
    crs.create("volumes", "Volume", "pin", {"size": "1Mi", "profile": profile})
    wait_for(lambda: _phase(crs, "pin") == "Available", 60, "Volume Available")
    # A dry-run delete would not run finalizers; instead check the protection finalizer is in place.
    backend = crs.get("storagebackends", stack.backend)
    assert "opensds.io/operator-protection" in backend["metadata"]["finalizers"]
    crs.delete("volumes", "pin")


# ---------------------------------------------------------------- issue 9 item 11: foreign classes

VSC = ("snapshot.storage.k8s.io", "v1", "volumesnapshotclasses")


def _foreign_classes(cluster: Cluster, name: str) -> tuple[str, str]:
    """A StorageClass and a VolumeSnapshotClass named `name` that someone else made; their UIDs."""
    sc = client.StorageV1Api(cluster.api).create_storage_class(client.V1StorageClass(
        metadata=client.V1ObjectMeta(name=name, labels=LABELS), provisioner="example.com/someone-else",
        parameters={"tier": "theirs"}))
    vsc = client.CustomObjectsApi(cluster.api).create_cluster_custom_object(*VSC, {
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
        "metadata": {"name": name, "labels": LABELS},
        "driver": "example.com/someone-else", "deletionPolicy": "Retain"})
    return sc.metadata.uid, vsc["metadata"]["uid"]


def _remove_classes(cluster: Cluster, name: str) -> None:
    deletes: list[Callable[[], object]] = [
        lambda: client.StorageV1Api(cluster.api).delete_storage_class(name),
        lambda: client.CustomObjectsApi(cluster.api).delete_cluster_custom_object(*VSC, name)]
    for delete in deletes:
        try:
            delete()
        except client.exceptions.ApiException as e:
            if e.status != 404:
                raise


def test_profile_named_like_foreign_classes_never_touches_them_and_reports_name_conflict(
        cluster: Cluster, stack: Stack) -> None:
    """The old operator deleted the other StorageClass and replaced it (and replaced the other
    VolumeSnapshotClass); deleting the profile then deleted them for good."""
    crs, storage = CRs(cluster.api), client.StorageV1Api(cluster.api)
    snapshot_classes = client.CustomObjectsApi(cluster.api)
    name = f"p-{uuid.uuid4().hex[:6]}"
    sc_uid, vsc_uid = _foreign_classes(cluster, name)
    try:
        crs.create("storageprofiles", "StorageProfile", name, {"storageType": "block", "accessProtocol": "local"})
        conflict: Any = wait_for(lambda: (c := condition(crs.get("storageprofiles", name), "NameConflict"))
                            and c["status"] == "True" and c, 30, "NameConflict condition")
        assert f"StorageClass {name}" in conflict["message"] and f"VolumeSnapshotClass {name}" in conflict["message"]
        assert condition(crs.get("storageprofiles", name), "Ready")["status"] == "False"  # type: ignore[index]
        wait_for(lambda: any(e.startswith("NameConflict:") for e in events_for(cluster.api, "default", name)),
                 30, "NameConflict Warning Event")
        sc = storage.read_storage_class(name)
        assert (sc.metadata.uid, sc.provisioner, sc.parameters) == (sc_uid, "example.com/someone-else",
                                                                    {"tier": "theirs"})
        vsc = snapshot_classes.get_cluster_custom_object(*VSC, name)
        assert (vsc["metadata"]["uid"], vsc["driver"]) == (vsc_uid, "example.com/someone-else")

        crs.delete("storageprofiles", name)
        wait_for(lambda: not crs.exists("storageprofiles", name), 30, "profile deleted")
        assert storage.read_storage_class(name).metadata.uid == sc_uid  # still there, still theirs
        assert snapshot_classes.get_cluster_custom_object(*VSC, name)["metadata"]["uid"] == vsc_uid
    finally:
        crs.delete_if_present("storageprofiles", name)
        _remove_classes(cluster, name)


def test_name_conflict_clears_once_the_foreign_class_is_gone(cluster: Cluster, stack: Stack,
                                                             profiles: Profiles) -> None:
    crs, storage = CRs(cluster.api), client.StorageV1Api(cluster.api)
    name = f"p-{uuid.uuid4().hex[:6]}"
    storage.create_storage_class(client.V1StorageClass(metadata=client.V1ObjectMeta(name=name, labels=LABELS),
                                                       provisioner="example.com/someone-else"))
    try:
        crs.create("storageprofiles", "StorageProfile", name, {"storageType": "block", "accessProtocol": "local"})
        wait_for(lambda: (condition(crs.get("storageprofiles", name), "NameConflict") or {}).get("status") == "True",
                 30, "NameConflict condition")
        storage.delete_storage_class(name)
        wait_for(lambda: (condition(crs.get("storageprofiles", name), "NameConflict") or {}).get("status") == "False",
                 90, "NameConflict resolved")
        sc = storage.read_storage_class(name)
        assert sc.provisioner == "block.csi.opensds.io"
        assert sc.metadata.labels["app.kubernetes.io/managed-by"] == "opensds-operator"
        assert condition(crs.get("storageprofiles", name), "Ready")["status"] == "True"  # type: ignore[index]
    finally:
        crs.delete_if_present("storageprofiles", name)
        wait_for(lambda: not crs.exists("storageprofiles", name), 30, "profile deleted")
        _remove_classes(cluster, name)


# ---------------------------------------------------------------- issue 9 item 9: authenticated by default

def test_network_profiles_without_a_secret_get_generated_credentials_unless_they_opt_out(
        cluster: Cluster, stack: Stack, profiles: Profiles) -> None:
    """The old operator made a StorageClass without node-stage secret: exports took any initiator
    claiming a node's NQN/IQN."""
    from opensds_operator.credentials import SECRET_NAME, dhchap_secret_valid

    storage = client.StorageV1Api(cluster.api)
    nvme, iscsi = profiles(accessProtocol="nvmeof-tcp"), profiles(accessProtocol="iscsi")
    opted_out = profiles(accessProtocol="iscsi", unauthenticatedExports=True)
    for name in (nvme, iscsi):
        sc: Any = wait_for(lambda n=name: storage.read_storage_class(n), 30, f"StorageClass {name}")  # type: ignore[misc]
        assert sc.parameters["csi.storage.k8s.io/node-stage-secret-name"] == SECRET_NAME
        assert sc.parameters["csi.storage.k8s.io/node-stage-secret-namespace"] == "opensds-system"
    open_sc: Any = wait_for(lambda: storage.read_storage_class(opted_out), 30, "StorageClass of the opted-out profile")
    assert "csi.storage.k8s.io/node-stage-secret-name" not in open_sc.parameters
    secret = client.CoreV1Api(cluster.api).read_namespaced_secret(SECRET_NAME, "opensds-system")
    data = {k: base64.b64decode(v).decode() for k, v in secret.data.items()}
    assert dhchap_secret_valid(data["dhchapHostKey"]) and dhchap_secret_valid(data["dhchapCtrlKey"])
    assert len(data["chapPassword"]) >= 16 and data["chapUser"]
    assert secret.metadata.labels["app.kubernetes.io/managed-by"] == "opensds-operator"
