"""The Volume/Snapshot lifecycle through the real operator and dock on an LVM thin pool.

Runs inside the VM (real device-mapper); the API is the host's kube-apiserver, reached through
QEMU's guestfwd (hack/vm.sh with OPENSDS_VM_APISERVER). Data is checked on the LV devices.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from opensds_operator.drivers.base import Owner
from opensds_operator.drivers.lvm import LvmDriver

from .kernel import sh
from .nodeplugin import write_at
from .stack import KUBECONFIG, G, MiB, Stack, V, digest, running_stack, wait

pytestmark = pytest.mark.skipif(not KUBECONFIG.exists(), reason="needs OPENSDS_VM_APISERVER (make e2e sets it)")


@pytest.fixture
def stack(thin_pool: tuple[str, str], nvmet: None) -> Iterator[Stack]:
    vg, pool = thin_pool
    with running_stack("lvm", lambda ns: {"driver": "lvm", "nodeName": "vm", "parameters": {
            "volumeGroup": vg, "thinPool": pool, "nvmeofAddresses": "127.0.0.1:4420"}}) as stack:
        stack.vg = vg
        yield stack


def test_lvm_backend_volume_snapshot_restore_expand_delete(stack: Stack) -> None:
    crs, ns, backend, vg = stack.crs, stack.ns, stack.backend, stack.vg

    def get(plural: str, name: str) -> dict[str, Any]:
        return crs.get_namespaced_custom_object(G, V, ns, plural, name)  # type: ignore[no-any-return]

    def create(plural: str, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return crs.create_namespaced_custom_object(  # type: ignore[no-any-return]
            G, V, ns, plural, {"apiVersion": f"{G}/{V}", "kind": kind, "metadata": {"name": name}, "spec": spec})

    def phase(name: str) -> str | None:
        return (get("volumes", name).get("status") or {}).get("phase")

    status = wait(lambda: (crs.get_cluster_custom_object(G, V, "storagebackends", backend).get("status") or {})
                  .get("pools"), 120, "backend pools")
    assert status[0]["totalBytes"] == 2**30 and "nvmeof-tcp" in status[0]["capabilities"]["protocols"]
    profile = f"lvm-{uuid.uuid4().hex[:6]}"
    crs.create_cluster_custom_object(G, V, "storageprofiles", {
        "apiVersion": f"{G}/{V}", "kind": "StorageProfile", "metadata": {"name": profile},
        "spec": {"storageType": "block", "accessProtocol": "local"}})
    try:
        vol = create("volumes", "Volume", "data", {"size": "64Mi", "profile": profile})
        wait(lambda: phase("data") == "Available", 180, "Volume Available")
        device = f"/dev/{vg}/vol-{vol['metadata']['uid']}"
        capacity = get("volumes", "data")["status"]["capacityBytes"]
        assert int(sh("blockdev", "--getsize64", device)) == 64 * MiB == capacity
        write_at(device, 2 * MiB, os.urandom(4 * MiB))
        original = digest(device, 64 * MiB)

        crs.patch_namespaced_custom_object(G, V, ns, "volumes", "data", {"spec": {"size": "128Mi"}})
        wait(lambda: get("volumes", "data")["status"].get("capacityBytes") == 128 * MiB, 180, "expanded")
        assert int(sh("blockdev", "--getsize64", device)) == 128 * MiB

        create("snapshots", "Snapshot", "snap", {"volumeName": "data"})
        wait(lambda: (get("snapshots", "snap").get("status") or {}).get("readyToUse"), 180, "Snapshot ready")
        restored = create("volumes", "Volume", "restored",
                          {"size": "128Mi", "profile": profile, "source": {"kind": "Snapshot", "name": "snap"}})
        wait(lambda: phase("restored") == "Available", 180, "restored Available")
        assert digest(f"/dev/{vg}/vol-{restored['metadata']['uid']}", 64 * MiB) == original

        for plural, name in (("volumes", "restored"), ("snapshots", "snap"), ("volumes", "data")):
            crs.delete_namespaced_custom_object(G, V, ns, plural, name)
        wait(lambda: not crs.list_namespaced_custom_object(G, V, ns, "volumes")["items"]
             and not crs.list_namespaced_custom_object(G, V, ns, "snapshots")["items"], 180, "CRs gone")
        lvs = sh("lvs", "--reportformat", "json", "-o", "lv_name", vg)
        assert "vol-" not in lvs and "snap-" not in lvs
    finally:
        crs.delete_cluster_custom_object(G, V, "storageprofiles", profile)


def _read_secret(core: Any, name: str) -> Any:
    from kubernetes.client.exceptions import ApiException
    try:
        return core.read_namespaced_secret(name, "opensds-system")
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def test_nvmeof_export_follows_published_nodes_and_is_rebuilt_after_a_dock_restart(stack: Stack) -> None:
    """ControllerPublish's effect (Volume.spec.publishedNodes) -> the dock's nvmet export -> the node plugin."""
    import grpc

    from opensds_csi.node import NodeService
    from opensds_csi.proto import csi_pb2, csi_pb2_grpc
    from opensds_csi.server import build_server
    from opensds_operator.exports.base import volume_nqn
    from opensds_operator.exports.nvmet import CONFIGFS

    crs, ns = stack.crs, stack.ns

    def volume() -> dict[str, Any]:
        return crs.get_namespaced_custom_object(G, V, ns, "volumes", "net")  # type: ignore[no-any-return]

    work = Path("/run/opensds-dock-e2e")
    work.mkdir(exist_ok=True)
    server = build_server(f"unix://{work}/node.sock", max_workers=4)
    csi_pb2_grpc.add_NodeServicer_to_server(NodeService("node-a", {}, str(work / "state")), server)
    server.start()
    node = csi_pb2_grpc.NodeStub(grpc.insecure_channel(f"unix://{work}/node.sock"))
    cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                                   access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))

    def node_stage_secrets() -> dict[str, str]:
        """What kubelet hands NodeStage: the generated Secret the StorageClass names (a network
        profile without nodeStageSecretRef is authenticated by default)."""
        from opensds_operator.credentials import SECRET_NAME

        secret = wait(lambda: _read_secret(client.CoreV1Api(crs.api_client), SECRET_NAME), 60, "generated Secret")
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def mount(context: dict[str, str]) -> Path:
        (work / "staging").mkdir(exist_ok=True)
        node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=f"{ns}/net", publish_context=context, staging_target_path=str(work / "staging"),
            volume_capability=cap, secrets=node_stage_secrets()))
        return work / "staging"

    def unmount() -> None:
        node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=f"{ns}/net", staging_target_path=str(work / "staging")))

    profile = f"nvme-{uuid.uuid4().hex[:6]}"
    crs.create_cluster_custom_object(G, V, "storageprofiles", {
        "apiVersion": f"{G}/{V}", "kind": "StorageProfile", "metadata": {"name": profile},
        "spec": {"storageType": "block", "accessProtocol": "nvmeof-tcp"}})
    try:
        crs.create_namespaced_custom_object(G, V, ns, "volumes", {
            "apiVersion": f"{G}/{V}", "kind": "Volume", "metadata": {"name": "net"},
            "spec": {"size": "64Mi", "profile": profile}})
        wait(lambda: (volume().get("status") or {}).get("phase") == "Available", 180, "Volume Available")
        crs.patch_namespaced_custom_object(G, V, ns, "volumes", "net", {"spec": {"publishedNodes": ["node-a"]}})
        status = wait(lambda: (s := volume().get("status") or {}).get("publishedNodes") == ["node-a"] and s, 120,
                      "export to node-a")
        context = dict(status["publishContext"])
        assert context["transport"] == "nvmeof-tcp" and context["addresses"] == "127.0.0.1:4420"
        assert context["auth"] == "dhchap-bidirectional", "a network profile without a Secret must authenticate"
        subsystem = CONFIGFS / "subsystems" / volume_nqn(f"vol-{volume()['metadata']['uid']}")
        payload = os.urandom(MiB)
        (mount(context) / "payload").write_bytes(payload)
        unmount()

        # a reboot empties configfs; the restarted dock rebuilds the export from the API
        stack.stop("dock")
        from opensds_operator.exports.nvmet import NvmetExporter
        NvmetExporter([("127.0.0.1", 4420)]).unexport(subsystem.name.split(":", 1)[1])
        assert not subsystem.exists()
        stack.start("dock")
        wait(lambda: (subsystem / "allowed_hosts" / "nqn.2024-11.io.opensds:node:node-a").exists(), 180,
             "export rebuilt after the dock restart")
        assert hashlib.sha256((mount(context) / "payload").read_bytes()).digest() == hashlib.sha256(payload).digest()
        unmount()

        # unpublish removes exactly that node's access
        crs.patch_namespaced_custom_object(G, V, ns, "volumes", "net", {"spec": {"publishedNodes": []}})
        wait(lambda: (volume().get("status") or {}).get("publishedNodes") == [], 120, "unexported")
        assert list((subsystem / "allowed_hosts").iterdir()) == []
        with pytest.raises(grpc.RpcError) as refused:
            mount(context)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        crs.delete_namespaced_custom_object(G, V, ns, "volumes", "net")
        wait(lambda: not crs.list_namespaced_custom_object(G, V, ns, "volumes")["items"], 180, "Volume gone")
        assert not subsystem.exists()
    finally:
        server.stop(None)
        crs.delete_cluster_custom_object(G, V, "storageprofiles", profile)


# ---------------------------------------------------------------- data safety (issue 9, items 1 and 3)


def _lvs(vg: str) -> dict[str, str]:
    """LV name -> its tags."""
    doc = json.loads(sh("lvs", "--reportformat", "json", "-o", "lv_name,lv_tags", "--", vg))
    return {r["lv_name"]: r["lv_tags"] for report in doc["report"] for r in report["lv"]}


def _events(name: str, namespace: str) -> list[str]:
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(KUBECONFIG)))
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return [f"{e.reason}: {e.message}" for e in events.items]


def _pool(stack: Stack) -> str:
    pools = wait(lambda: (stack.crs.get_cluster_custom_object(G, V, "storagebackends", stack.backend)
                          .get("status") or {}).get("pools"), 120, "backend pools")
    return str(pools[0]["name"])


@pytest.fixture
def local_profile(stack: Stack) -> Iterator[str]:
    profile = f"lvm-{uuid.uuid4().hex[:6]}"
    stack.crs.create_cluster_custom_object(G, V, "storageprofiles", {
        "apiVersion": f"{G}/{V}", "kind": "StorageProfile", "metadata": {"name": profile},
        "spec": {"storageType": "block", "accessProtocol": "local"}})
    yield profile
    stack.crs.delete_cluster_custom_object(G, V, "storageprofiles", profile)


def test_lv_missing_at_dock_start_is_reported_and_never_recreated_empty(stack: Stack, local_profile: str) -> None:
    crs, ns, vg = stack.crs, stack.ns, stack.vg

    def volume() -> dict[str, Any]:
        return crs.get_namespaced_custom_object(G, V, ns, "volumes", "data")  # type: ignore[no-any-return]

    def ready() -> dict[str, Any] | None:
        c = next((c for c in (volume().get("status") or {}).get("conditions", []) if c["type"] == "Ready"), None)
        return c

    pool = _pool(stack)
    vol = crs.create_namespaced_custom_object(G, V, ns, "volumes", {
        "apiVersion": f"{G}/{V}", "kind": "Volume", "metadata": {"name": "data"},
        "spec": {"size": "64Mi", "profile": local_profile, "backend": stack.backend, "pool": pool}})
    wait(lambda: (volume().get("status") or {}).get("phase") == "Available", 180, "Volume Available")
    lv, aside = f"vol-{vol['metadata']['uid']}", f"aside-{vol['metadata']['uid']}"
    write_at(f"/dev/{vg}/{lv}", 3 * MiB, os.urandom(4 * MiB))
    original = digest(f"/dev/{vg}/{lv}", 64 * MiB)

    stack.kill("dock")
    sh("lvrename", "--", f"{vg}/{lv}", f"{vg}/{aside}")  # as an inactive VG or a wrong edit would hide it
    stack.start("dock")
    missing = wait(lambda: (c := ready()) and c["status"] == "False" and c["reason"] == "BackendObjectMissing" and c,
                   180, "BackendObjectMissing")
    assert "not re-created" in missing["message"]
    assert volume()["status"]["code"] == "BackendObjectMissing"
    wait(lambda: any(e.startswith("BackendObjectMissing") for e in _events("data", ns)), 60, "the Warning Event")
    time.sleep(5)  # give a wrong dock every chance to make a blank one
    lvs = _lvs(vg)
    assert lv not in lvs and f"quarantine-{lv}" not in lvs, "the dock made a blank LV in place of the missing one"
    assert aside in lvs

    sh("lvrename", "--", f"{vg}/{aside}", f"{vg}/{lv}")  # the data is back
    stack.kill("dock")
    stack.start("dock")
    wait(lambda: (volume().get("status") or {}).get("phase") == "Available"
         and (ready() or {}).get("status") == "True", 180, "Available again")
    assert digest(f"/dev/{vg}/{lv}", 64 * MiB) == original
    crs.delete_namespaced_custom_object(G, V, ns, "volumes", "data")
    wait(lambda: not crs.list_namespaced_custom_object(G, V, ns, "volumes")["items"], 180, "Volume gone")
    assert lv not in _lvs(vg)


def test_sweep_quarantines_only_its_own_orphan_lvs_and_purges_them_later(stack: Stack) -> None:
    api = config.new_client_from_config(config_file=str(KUBECONFIG))
    cluster = str(client.CoreV1Api(api).read_namespace("kube-system").metadata.uid)
    pool, vg = _pool(stack), stack.vg
    driver = LvmDriver(vg, pool)
    ours, theirs, untagged = (f"vol-{uuid.uuid4()}" for _ in range(3))
    driver.create_volume(ours, pool, 4 * MiB, True,
                         owner=Owner(cluster, stack.backend, "Volume", stack.ns, "lost", ours[4:]))
    driver.create_volume(theirs, pool, 4 * MiB, True,
                         owner=Owner(str(uuid.uuid4()), stack.backend, "Volume", stack.ns, "x", theirs[4:]))
    driver.create_volume(untagged, pool, 4 * MiB, True)
    write_at(f"/dev/{vg}/{theirs}", 0, b"theirs" * 1000)
    theirs_digest = digest(f"/dev/{vg}/{theirs}", 4 * MiB)

    stack.kill("dock")
    stack.dock_args = ["--quarantine-hours", "0.002", "--orphan-interval", "3"]
    started = time.monotonic()
    stack.start("dock")
    wait(lambda: f"quarantine-{ours}" in _lvs(vg), 180, "our orphan LV quarantined")
    quarantined = time.monotonic() - started
    assert ours not in _lvs(vg)
    assert "opensds.quarantined=" in _lvs(vg)[f"quarantine-{ours}"]
    # When the dock quarantined it, from its own tag: the test sees the rename seconds late under TCG
    # (each `lvs` poll is slow), and measuring from that sighting failed a correct purge.
    tagged_at = next(o.quarantined_at for o in driver.scan(pool) if o.backend_id == ours and o.quarantined_at)
    wait(lambda: any(e.startswith("OrphanQuarantined") and ours in e for e in _events(stack.backend, "default")), 60,
         "the OrphanQuarantined Event")
    wait(lambda: not {ours, f"quarantine-{ours}"} & set(_lvs(vg)), 180, "quarantine purged")
    purged = time.monotonic() - started
    assert time.time() - tagged_at >= 0.002 * 3600, "purged before the quarantine period was over"
    time.sleep(8)  # more sweeps
    lvs = _lvs(vg)
    assert {theirs, untagged} <= set(lvs), "the sweep touched what it cannot prove is its garbage"
    assert not {f"quarantine-{theirs}", f"quarantine-{untagged}"} & set(lvs)
    assert digest(f"/dev/{vg}/{theirs}", 4 * MiB) == theirs_digest
    status = stack.crs.get_cluster_custom_object(G, V, "storagebackends", stack.backend)["status"]
    assert status["foreignObjects"] >= 2
    print(f"quarantined after {quarantined:.1f} s, purged after {purged:.1f} s")
    for lv in (theirs, untagged):
        driver.delete_volume(lv, pool)
