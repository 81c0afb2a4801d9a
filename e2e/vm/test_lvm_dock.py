"""The Volume/Snapshot lifecycle through the real operator and dock on an LVM thin pool.

Runs inside the VM (real device-mapper); the API is the host's kube-apiserver, reached through
QEMU's guestfwd (hack/vm.sh with OPENSDS_VM_APISERVER). Data is checked on the LV devices.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from .conftest import SCRATCH, sh

G, V = "opensds.io", "v1alpha1"
MiB = 2**20
KUBECONFIG = SCRATCH / "kubeconfig"

pytestmark = pytest.mark.skipif(not KUBECONFIG.exists(), reason="needs OPENSDS_VM_APISERVER (make e2e sets it)")


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def digest(device: str, length: int) -> str:
    with open(device, "rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


@pytest.fixture
def stack(thin_pool: tuple[str, str]) -> Iterator[tuple[client.CustomObjectsApi, str, str, str]]:
    vg, pool = thin_pool
    api = config.new_client_from_config(config_file=str(KUBECONFIG))
    crs = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    tag = uuid.uuid4().hex[:6]
    backend, ns = f"lvm-{tag}", f"e2e-lvm-{tag}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    crs.create_cluster_custom_object(G, V, "storagebackends", {
        "apiVersion": f"{G}/{V}", "kind": "StorageBackend", "metadata": {"name": backend},
        "spec": {"driver": "lvm", "nodeName": "vm", "parameters": {"volumeGroup": vg, "thinPool": pool}}})
    env = {**os.environ, "KUBECONFIG": str(KUBECONFIG)}
    bindir = Path(sys.executable).parent
    log = open(SCRATCH / f"{backend}.log", "ab")  # noqa: SIM115
    procs = [subprocess.Popen([str(bindir / "opensds-operator")], env=env, stdout=log, stderr=log),
             subprocess.Popen([str(bindir / "opensds-dock"), "--backend", backend, "--capacity-interval", "5"],
                              env=env, stdout=log, stderr=log)]
    try:
        yield crs, ns, backend, vg
    finally:
        crs.delete_cluster_custom_object(G, V, "storagebackends", backend)
        core.delete_namespace(ns)
        time.sleep(3)
        for p in procs:
            p.terminate()
            p.wait(20)


def test_lvm_backend_volume_snapshot_restore_expand_delete(
        stack: tuple[client.CustomObjectsApi, str, str, str]) -> None:
    crs, ns, backend, vg = stack

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
        fd = os.open(device, os.O_WRONLY)
        os.pwrite(fd, os.urandom(4 * MiB), 2 * MiB)
        os.fsync(fd)
        os.close(fd)
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
