"""A CSI node plugin inside the VM, driven over its socket the way kubelet would."""
from __future__ import annotations

import os
from pathlib import Path

import grpc

from opensds_csi.node import NodeService
from opensds_csi.proto import csi_pb2, csi_pb2_grpc
from opensds_csi.server import build_server

WORK = Path("/run/opensds-e2e")  # tmpfs inside the VM
Mode = csi_pb2.VolumeCapability.AccessMode


def capability(fs: str | None) -> csi_pb2.VolumeCapability:
    access = csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER)
    if fs is None:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=access)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs), access_mode=access)


class Node:
    """A CSI node plugin for one node id, on its own socket."""

    def __init__(self, node_id: str) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        endpoint = f"unix://{WORK}/{node_id}.sock"
        self.server = build_server(endpoint, max_workers=4)
        # Local roots: the file backends tests make under /run (tmpfs in the VM).
        service = NodeService(node_id, {}, str(WORK / f"{node_id}-state"), local_roots=["/run"])
        csi_pb2_grpc.add_NodeServicer_to_server(service, self.server)
        self.server.start()
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = csi_pb2_grpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()  # the socket file is gone before a successor binds it


def stage(node: Node, volume_id: str, context: dict[str, str], cap: csi_pb2.VolumeCapability,
          volume_context: dict[str, str] | None = None, secrets: dict[str, str] | None = None) -> Path:
    staging = WORK / f"{volume_id}-staging"
    staging.mkdir(parents=True, exist_ok=True)
    node.stub.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, publish_context=context, staging_target_path=str(staging), volume_capability=cap,
        secrets=secrets or {}))
    target = WORK / f"{volume_id}-target"
    node.stub.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, publish_context=context, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap, volume_context=volume_context or {}))
    return target


def unstage(node: Node, volume_id: str) -> None:
    node.stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=str(WORK / f"{volume_id}-target")))
    node.stub.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(WORK / f"{volume_id}-staging")))


def write_at(device: Path | str, offset: int, data: bytes) -> None:
    """Write to a block device (or a raw-block publish target) and make it durable."""
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(device: Path | str, offset: int, length: int) -> bytes:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
