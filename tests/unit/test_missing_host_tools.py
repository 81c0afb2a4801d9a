"""A host tool that is not installed is a FAILED_PRECONDITION (CSI) or a Ready=False condition
(dock) naming the Debian package that provides it, never an INTERNAL FileNotFoundError.

PATH is pointed at an empty directory, so no tool can be found; the table is
opensds_operator.hosttools, shared by both sides.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import kopf
import pytest

from opensds_csi import mounts
from opensds_csi.errors import ToolMissing, csi_error
from opensds_csi.proto import csi_pb2, csi_pb2_grpc
from opensds_csi.run import run
from opensds_csi.server import LoggingAndErrors
from opensds_operator.api import VOLUMES
from opensds_operator.drivers.base import PermanentDriverError
from opensds_operator.drivers.lvm import LvmDriver
from opensds_operator.handlers.dock import Dock
from opensds_operator.hosttools import PACKAGES, missing_tool_message

from .test_dock_safety import BACKEND, NS, SCHEDULED, FakeApi, _body


@pytest.fixture
def no_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return empty


def test_the_table_names_a_package_for_every_tool_the_node_runs() -> None:
    for tool in ("mkfs.xfs", "xfs_growfs", "mkfs.ext4", "resize2fs", "blkid", "blockdev", "losetup", "mount",
                 "umount", "nvme", "iscsiadm", "multipath", "dmsetup", "rbd", "modprobe", "lvs", "lvcreate"):
        assert PACKAGES.get(tool), tool
    assert missing_tool_message("/usr/sbin/mkfs.xfs") == \
        "mkfs.xfs not found on this node: install the Debian package xfsprogs"


def test_run_of_a_missing_tool_is_failed_precondition_naming_the_package(no_tools: Path) -> None:
    with pytest.raises(ToolMissing) as raised:
        run("mkfs.xfs", "-q", "/dev/null")
    assert raised.value.code_name == "FAILED_PRECONDITION"
    assert raised.value.message == "mkfs.xfs not found on this node: install the Debian package xfsprogs"


@pytest.mark.parametrize(("fstype", "package"), [("xfs", "xfsprogs"), ("ext4", "e2fsprogs")])
def test_mkfs_without_its_package_names_the_package(no_tools: Path, fstype: str, package: str) -> None:
    with pytest.raises(ToolMissing, match=f"mkfs.{fstype} not found on this node: install the Debian package "
                                          f"{package}"):
        mounts.make_filesystem("/dev/null", fstype)


def test_a_missing_tool_outside_run_is_mapped_too() -> None:
    error = csi_error(FileNotFoundError(2, "No such file or directory", "iscsiadm"))
    assert error.code_name == "FAILED_PRECONDITION" and "open-iscsi" in error.message
    # a missing file that is not a tool stays what it was
    assert csi_error(FileNotFoundError(2, "No such file or directory", "/var/lib/x")).code_name == "INTERNAL"


class _MkfsNode(csi_pb2_grpc.NodeServicer):
    def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest,
                        context: grpc.ServicerContext) -> csi_pb2.NodeStageVolumeResponse:
        mounts.make_filesystem("/dev/null", "xfs")
        return csi_pb2.NodeStageVolumeResponse()


@pytest.fixture
def grpc_node(tmp_path: Path) -> Iterator[csi_pb2_grpc.NodeStub]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[LoggingAndErrors()])
    csi_pb2_grpc.add_NodeServicer_to_server(_MkfsNode(), server)
    server.add_insecure_port(f"unix://{tmp_path}/node.sock")
    server.start()
    channel = grpc.insecure_channel(f"unix://{tmp_path}/node.sock")
    yield csi_pb2_grpc.NodeStub(channel)
    channel.close()
    server.stop(None)


def test_through_grpc_the_code_is_failed_precondition(grpc_node: csi_pb2_grpc.NodeStub, no_tools: Path) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        grpc_node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(volume_id="ns/v"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "install the Debian package xfsprogs" in (raised.value.details() or "")


def test_lvm_driver_without_lvm2_is_a_permanent_error_naming_the_package(no_tools: Path) -> None:
    with pytest.raises(PermanentDriverError, match="lvs not found on this node: install the Debian package lvm2"):
        LvmDriver("vg0", "pool0").pools()


def test_the_dock_reports_the_missing_package_in_the_volume_condition(no_tools: Path) -> None:
    api = FakeApi()
    api.add("storagebackends", BACKEND, {"driver": "lvm"}, namespace=None)
    api.add("storageprofiles", "thin", {"storageType": "block", "accessProtocol": "local"}, namespace=None)
    api.add(VOLUMES, "data", {"size": "4Mi", "profile": "thin", "backend": BACKEND, "pool": "pool0"},
            status=dict(SCHEDULED))
    dock = Dock(BACKEND, LvmDriver("vg0", "pool0"), api=api)
    dock.capacity_changed = lambda: None  # type: ignore[method-assign]
    with pytest.raises(kopf.PermanentError):
        dock.reconcile_volume(_body(api, VOLUMES, "data", NS))
    status = api.get(VOLUMES, "data", NS)["status"]  # type: ignore[index]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert "not found on this node: install the Debian package lvm2" in ready["message"]
