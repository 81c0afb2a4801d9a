"""Each CSI call is logged once with a request id, its redacted request, code and duration;
secrets (NodeStage's node-stage Secret, any csi_secret field) never reach the log."""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from opensds_csi.node import NodeService
from opensds_csi.proto import csi_pb2, csi_pb2_grpc
from opensds_csi.server import build_server, redacted

SECRET = "DHHC-1:00:c2VjcmV0LXRoYXQtbXVzdC1uZXZlci1sZWFr:"


@pytest.fixture
def node_stub(tmp_path: Path) -> Iterator[csi_pb2_grpc.NodeStub]:
    server = build_server(f"unix://{tmp_path}/csi.sock", max_workers=2)
    csi_pb2_grpc.add_NodeServicer_to_server(NodeService("n1", {}, str(tmp_path / "state")), server)
    server.start()
    channel = grpc.insecure_channel(f"unix://{tmp_path}/csi.sock")
    try:
        yield csi_pb2_grpc.NodeStub(channel)
    finally:
        channel.close()
        server.stop(0)


def test_node_stage_secrets_never_reach_the_log(node_stub: csi_pb2_grpc.NodeStub, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    request = csi_pb2.NodeStageVolumeRequest(
        volume_id="opensds-system/pvc-1", staging_target_path=str(tmp_path / "staging"),
        publish_context={"transport": "no-such-transport"},
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)),
        secrets={"dhchapHostKey": SECRET, "chapPassword": "hunter2-chap"})
    with pytest.raises(grpc.RpcError) as err:
        node_stub.NodeStageVolume(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert SECRET not in caplog.text and "hunter2-chap" not in caplog.text
    assert 'key: "dhchapHostKey" value: "***"' in caplog.text  # keys stay for debugging, values never
    [logged] = [r.getMessage() for r in caplog.records if "NodeStageVolume request" in r.getMessage()]
    assert re.match(r"ID [0-9a-f]+-\d+ /csi\.v1\.Node/NodeStageVolume request: ", logged)
    [outcome] = [r.getMessage() for r in caplog.records if "NodeStageVolume ->" in r.getMessage()]
    assert "INVALID_ARGUMENT" in outcome and outcome.endswith("ms)")


def test_every_csi_secret_field_is_redacted_and_the_request_is_left_alone() -> None:
    request = csi_pb2.CreateVolumeRequest(name="v", secrets={"k": "s3cr3t"}, parameters={"profile": "p"})
    text = redacted(request)
    assert "s3cr3t" not in text and '"***"' in text and 'value: "p"' in text
    assert request.secrets["k"] == "s3cr3t"
    for message in (csi_pb2.NodePublishVolumeRequest, csi_pb2.ControllerPublishVolumeRequest,
                    csi_pb2.DeleteSnapshotRequest, csi_pb2.NodeExpandVolumeRequest):
        assert "s3cr3t" not in redacted(message(secrets={"a": "s3cr3t"}))
