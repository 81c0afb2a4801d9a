"""The embedded file backend + loop devices on the real kernel, and node plugin restarts.

The file driver's sparse file is attached by the node's `local` connector (a loop device found
or made via `losetup --json`); inside the VM the node also holds CAP_SYS_RESOURCE, so ext4 grows
online here (the CI host's sandbox withholds it). A node plugin that dies between NodeStage and
kubelet's retry answers the retry from its persisted state, with the same device, and unstages
cleanly (test_datapath.py proves the same for NVMe/TCP and iSCSI).
"""
from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from opensds_csi.proto import csi_pb2
from opensds_operator.drivers.file import FileDriver

from .nodeplugin import Node, capability, read_at, stage, unstage, write_at

MiB = 2**20


@pytest.fixture
def file_volume() -> Iterator[tuple[FileDriver, str, dict[str, str]]]:
    root = Path("/run") / f"files-{uuid.uuid4().hex[:6]}"  # tmpfs inside the VM
    driver = FileDriver(str(root))
    backend_id = f"vol-{uuid.uuid4()}"
    driver.create_volume(backend_id, "default", 320 * MiB, thin=True)
    yield driver, backend_id, driver.export(backend_id, "default", ["node-a"])
    driver.delete_volume(backend_id, "default")


def _loops_of(path: str) -> list[str]:
    import json
    import subprocess

    out = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True).stdout
    return [d["name"] for d in json.loads(out or '{"loopdevices": []}')["loopdevices"]
            if (d.get("back-file") or "").startswith(path)]


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_file_volume_on_loop_survives_a_fresh_attach_and_grows_online(
        file_volume: tuple[FileDriver, str, dict[str, str]], node: Node, fs: str) -> None:
    driver, backend_id, context = file_volume
    target = stage(node, backend_id, context, capability(fs))
    payload = os.urandom(4 * MiB)
    (target / "payload").write_bytes(payload)
    unstage(node, backend_id)
    assert _loops_of(context["path"]) == []
    target = stage(node, backend_id, context, capability(fs))
    assert hashlib.sha256((target / "payload").read_bytes()).digest() == hashlib.sha256(payload).digest()
    before = os.statvfs(target)
    driver.extend_volume(backend_id, "default", 448 * MiB)
    grown = node.stub.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(volume_id=backend_id, volume_path=str(target)))
    after = os.statvfs(target)
    assert grown.capacity_bytes == 448 * MiB
    assert (after.f_blocks - before.f_blocks) * after.f_frsize >= 100 * MiB
    unstage(node, backend_id)


def test_file_volume_raw_block_bytes_survive_a_fresh_attach(
        file_volume: tuple[FileDriver, str, dict[str, str]], node: Node) -> None:
    _, backend_id, context = file_volume
    target = stage(node, backend_id, context, capability(None))
    pattern = os.urandom(MiB)
    write_at(target, 16 * MiB, pattern)
    unstage(node, backend_id)
    target = stage(node, backend_id, context, capability(None))
    assert read_at(target, 16 * MiB, MiB) == pattern
    unstage(node, backend_id)


def test_a_restarted_node_plugin_answers_the_retry_from_its_state(
        file_volume: tuple[FileDriver, str, dict[str, str]]) -> None:
    _, backend_id, context = file_volume
    first = Node("node-a")
    target = stage(first, backend_id, context, capability("ext4"))
    (target / "kept").write_bytes(b"before the restart")
    first.close()  # the plugin dies; kubelet repeats both calls against its successor
    second = Node("node-a")
    try:
        again = stage(second, backend_id, context, capability("ext4"))
        assert again == target and (again / "kept").read_bytes() == b"before the restart"
        assert len(_loops_of(context["path"])) == 1  # the same loop device, not a second one
        unstage(second, backend_id)
        assert _loops_of(context["path"]) == []
    finally:
        second.close()
