"""Ceph RBD + krbd on a real kernel and a real Ceph cluster (running inside the VM).

The RBD driver makes the image over librbd; the node plugin maps it with `rbd device map`
under the cephx identity from the node-stage secrets, formats, mounts, grows it online and
unmaps it. Access to RBD is governed by cephx, not by a target's host list: a node without the
key, or with a wrong one, maps nothing.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from opensds_csi.connectors.rbd import mapped_device
from opensds_csi.proto import csi_pb2
from opensds_operator.drivers.rbd import RbdDriver

from .nodeplugin import Node, capability, read_at, stage, unstage, write_at

MiB = 2**20
POOL = "opensds"


@dataclass
class Image:
    driver: RbdDriver
    backend_id: str
    context: dict[str, str]
    secrets: dict[str, str]

    def mapped(self) -> str | None:
        return mapped_device(POOL, self.backend_id)


@pytest.fixture
def image(ceph: tuple[str, str]) -> Iterator[Image]:
    conf, key = ceph
    driver = RbdDriver(conf, POOL, "opensds", key=key)
    backend_id = f"vol-{uuid.uuid4()}"
    driver.create_volume(backend_id, POOL, 320 * MiB, thin=True)
    yield Image(driver, backend_id, driver.export(backend_id, POOL, ["node-a"]), {"userID": "opensds", "userKey": key})
    device = mapped_device(POOL, backend_id)
    if device:
        os.system(f"rbd device unmap {device}")
    driver.delete_volume(backend_id, POOL)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_filesystem_on_krbd_survives_a_fresh_map_and_grows_online(image: Image, node: Node, fs: str) -> None:
    assert image.context["transport"] == "rbd" and image.context["image"] == image.backend_id
    target = stage(node, image.backend_id, image.context, capability(fs), secrets=image.secrets)
    assert (image.mapped() or "").startswith("/dev/rbd")
    payload = os.urandom(4 * MiB)
    (target / "payload").write_bytes(payload)
    unstage(node, image.backend_id)
    assert image.mapped() is None
    target = stage(node, image.backend_id, image.context, capability(fs), secrets=image.secrets)
    assert hashlib.sha256((target / "payload").read_bytes()).digest() == hashlib.sha256(payload).digest()
    before = os.statvfs(target)
    image.driver.extend_volume(image.backend_id, POOL, 448 * MiB)
    grown = node.stub.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=image.backend_id, volume_path=str(target)))
    after = os.statvfs(target)
    assert grown.capacity_bytes == 448 * MiB
    assert (after.f_blocks - before.f_blocks) * after.f_frsize >= 100 * MiB
    unstage(node, image.backend_id)
    assert image.mapped() is None


def test_raw_block_on_krbd_survives_a_fresh_map(image: Image, node: Node) -> None:
    target = stage(node, image.backend_id, image.context, capability(None), secrets=image.secrets)
    pattern = os.urandom(MiB)
    write_at(target, 16 * MiB, pattern)
    unstage(node, image.backend_id)
    target = stage(node, image.backend_id, image.context, capability(None), secrets=image.secrets)
    assert read_at(target, 16 * MiB, MiB) == pattern
    unstage(node, image.backend_id)


def test_a_node_without_the_right_cephx_key_maps_nothing(image: Image, node: Node) -> None:
    with pytest.raises(grpc.RpcError) as missing:
        stage(node, image.backend_id, image.context, capability("ext4"))
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "userID and userKey" in (missing.value.details() or "")
    wrong = {"userID": "opensds", "userKey": "AQBzPhlnAAAAABAAVrw0Y2CjYd6X5Z1P8h2dvg=="}
    with pytest.raises(grpc.RpcError) as refused:
        stage(node, image.backend_id, image.context, capability("ext4"), secrets=wrong)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert wrong["userKey"] not in (refused.value.details() or "")  # keys never reach messages
    assert image.mapped() is None
