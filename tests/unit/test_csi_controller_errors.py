"""The CSI controller's error paths against an injected fake API: the failure a CR records
reaches the caller as the gRPC code the CSI spec prescribes (one table), and API failures
are clear codes, not INTERNAL tracebacks."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes.client.exceptions import ApiException

from opensds_csi.controller import FAILURE_CODES, ControllerService, recorded_failure
from opensds_csi.errors import (
    Aborted,
    CsiError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    csi_error,
)
from opensds_csi.identity import DRIVER_NAME
from opensds_csi.proto import csi_pb2, csi_pb2_grpc
from opensds_csi.server import build_server
from opensds_csi.store import ObjectStore
from opensds_operator import api

from .fake_cluster import FakeClusterApi, FakeContext, Reaction

NS = "opensds-system"
MOUNT = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))


def _failed(code: str, message: str = "it failed", condition: str = api.READY) -> dict[str, Any]:
    return {"phase": api.ERROR, "code": code,
            "conditions": [{"type": condition, "status": "False", "reason": code, "message": message}]}


def controller(react: Reaction | None = None) -> tuple[ControllerService, FakeClusterApi]:
    store = ObjectStore(NS)
    fake = FakeClusterApi(store, react)
    fake.add(api.PROFILES, {"metadata": {"name": "p"}, "spec": {"storageType": "block", "accessProtocol": "local"}})
    return ControllerService(store, wait_timeout=0.5, api=fake), fake


def create(service: ControllerService, name: str = "pvc-1", **fields: Any) -> csi_pb2.CreateVolumeResponse:
    request = csi_pb2.CreateVolumeRequest(name=name, parameters={"profile": "p"}, volume_capabilities=[MOUNT],
                                          **fields)
    return service.CreateVolume(request, FakeContext())  # type: ignore[arg-type]


def from_snapshot(snapshot_id: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


# ------------------------------------------------------------ the table


@pytest.mark.parametrize(("code", "expected"), [
    (api.CODE_SOURCE_NOT_FOUND, NotFound),
    (api.CODE_PROFILE_NOT_FOUND, InvalidArgument),
    (api.CODE_INVALID_PARAMETERS, InvalidArgument),
    (api.CODE_CROSS_NAMESPACE_SOURCE, InvalidArgument),
    (api.CODE_PLACEMENT_INVALID, InvalidArgument),
    (api.CODE_UNSCHEDULABLE, ResourceExhausted),
    (api.CODE_CAPACITY_EXHAUSTED, ResourceExhausted),
    (api.CODE_BACKEND_OBJECT_MISSING, FailedPrecondition),
    (api.CODE_EXPORT_FAILED, FailedPrecondition),
])
def test_each_failure_code_maps_to_the_csi_prescribed_grpc_code(code: str, expected: type[CsiError]) -> None:
    assert FAILURE_CODES[code] is expected
    error = recorded_failure({"metadata": {"generation": 1}, "status": _failed(code, "why")})
    assert type(error) is expected and error is not None and error.message == f"{code}: why"


def test_every_failure_code_of_the_shared_contract_is_in_the_table() -> None:
    codes = {v for k, v in vars(api).items() if k.startswith("CODE_")}
    assert codes == set(FAILURE_CODES)


def test_only_capacity_codes_are_resource_exhausted() -> None:
    assert {c for c, kind in FAILURE_CODES.items() if kind is ResourceExhausted} == {
        api.CODE_UNSCHEDULABLE, api.CODE_CAPACITY_EXHAUSTED}


def test_transient_code_and_no_code_keep_waiting() -> None:
    assert recorded_failure({"metadata": {}, "status": _failed(api.CODE_BACKEND_UNAVAILABLE)}) is None
    assert recorded_failure({"metadata": {}, "status": {"phase": api.CREATING}}) is None


def test_condition_reason_is_the_code_when_status_code_is_absent() -> None:
    status = {"conditions": [{"type": api.SCHEDULED, "status": "False", "reason": api.CODE_SOURCE_NOT_FOUND,
                              "message": "source Snapshot ns/s does not exist"}]}
    error = recorded_failure({"metadata": {}, "status": status})
    assert isinstance(error, NotFound) and "ns/s does not exist" in error.message


def test_a_failure_recorded_for_an_older_generation_is_stale() -> None:
    status = {**_failed(api.CODE_EXPORT_FAILED), "observedGeneration": 1}
    status["conditions"][0]["observedGeneration"] = 1
    assert recorded_failure({"metadata": {"generation": 2}, "status": status}) is None


def test_phase_error_with_an_unknown_or_no_code_is_failed_precondition_not_resource_exhausted() -> None:
    error = recorded_failure({"metadata": {}, "status": _failed("SomethingNew", "new kind of failure")})
    assert isinstance(error, FailedPrecondition) and error.message == "SomethingNew: new kind of failure"
    error = recorded_failure({"metadata": {}, "status": {"phase": api.ERROR}})
    assert isinstance(error, FailedPrecondition) and "without a message" in error.message


# ------------------------------------------------------------ CreateVolume


def test_create_volume_from_a_missing_snapshot_is_not_found() -> None:
    service, fake = controller()
    with pytest.raises(NotFound, match="does not exist"):
        create(service, volume_content_source=from_snapshot(f"{NS}/gone"))
    assert "create" not in fake.calls


def test_create_volume_whose_source_vanished_before_scheduling_is_not_found_and_leaves_no_cr() -> None:
    service, fake = controller(lambda plural, obj: _failed(api.CODE_SOURCE_NOT_FOUND, "source Snapshot gone",
                                                           api.SCHEDULED) if plural == api.VOLUMES else None)
    fake.add(api.SNAPSHOTS, {"metadata": {"name": "s"}, "spec": {"volumeName": "v"},
                             "status": {"readyToUse": True, "sizeBytes": 1 << 20}}, NS)
    with pytest.raises(NotFound, match="SourceNotFound: source Snapshot gone"):
        create(service, volume_content_source=from_snapshot(f"{NS}/s"))
    assert fake.get(api.VOLUMES, "pvc-1", NS) is None


def test_create_volume_with_invalid_parameters_is_invalid_argument() -> None:
    service, _ = controller(lambda plural, obj: _failed(api.CODE_INVALID_PARAMETERS, "bad cloneDepth"))
    with pytest.raises(InvalidArgument, match="bad cloneDepth"):
        create(service)


def test_create_volume_no_pool_fits_is_resource_exhausted() -> None:
    service, _ = controller(lambda plural, obj: _failed(api.CODE_UNSCHEDULABLE, "no pool fits", api.SCHEDULED))
    with pytest.raises(ResourceExhausted, match="no pool fits"):
        create(service)


def test_create_volume_whose_backend_object_vanished_is_failed_precondition_and_the_cr_is_kept() -> None:
    service, fake = controller(lambda plural, obj: {**_failed(api.CODE_BACKEND_OBJECT_MISSING, "gone"),
                                                    "backendVolumeID": "vol-x"})
    with pytest.raises(FailedPrecondition, match="BackendObjectMissing"):
        create(service)
    assert fake.get(api.VOLUMES, "pvc-1", NS) is not None, "deleting it would let the sweep take data that returns"


def test_create_volume_waiting_on_a_transient_failure_times_out_saying_why() -> None:
    service, fake = controller(lambda plural, obj: _failed(api.CODE_BACKEND_UNAVAILABLE, "VG not active"))
    with pytest.raises(DeadlineExceeded, match="BackendUnavailable: VG not active"):
        create(service)
    assert fake.get(api.VOLUMES, "pvc-1", NS) is not None


def test_create_volume_beyond_the_largest_size_is_out_of_range() -> None:
    service, fake = controller()
    with pytest.raises(OutOfRange, match="largest volume"):
        create(service, capacity_range=csi_pb2.CapacityRange(required_bytes=api.MAX_VOLUME_BYTES + 1))
    assert "create" not in fake.calls


def test_create_volume_racing_another_replica_is_aborted_not_already_exists() -> None:
    service, fake = controller()
    fake.failures["create"] = ApiException(status=409, reason="Conflict")
    with pytest.raises(Aborted):
        create(service)


# ------------------------------------------------------------ publish / snapshots


def test_publish_to_a_node_id_that_is_no_node_name_is_not_found_without_touching_the_api() -> None:
    service, fake = controller(lambda plural, obj: {"phase": api.AVAILABLE})
    create(service)
    before = list(fake.calls)
    request = csi_pb2.ControllerPublishVolumeRequest(volume_id=f"{NS}/pvc-1", node_id="x/../../tmp/PWNED",
                                                     volume_capability=MOUNT)
    with pytest.raises(NotFound, match="no CSINode"):
        service.ControllerPublishVolume(request, FakeContext())  # type: ignore[arg-type]
    assert "patch" not in fake.calls[len(before):] and "csi_node_ids" not in fake.calls[len(before):]


def test_publish_whose_export_fails_is_failed_precondition_at_once() -> None:
    def react(plural: str, obj: dict[str, Any]) -> dict[str, Any] | None:
        if obj["spec"].get("publishedNodes"):
            return {**_failed(api.CODE_EXPORT_FAILED, "nvmet refused the key"), "phase": api.AVAILABLE}
        return {"phase": api.AVAILABLE}

    service, fake = controller(react)
    fake.csi_nodes["n1"] = {DRIVER_NAME: "n1"}
    create(service)
    request = csi_pb2.ControllerPublishVolumeRequest(volume_id=f"{NS}/pvc-1", node_id="n1", volume_capability=MOUNT)
    with pytest.raises(FailedPrecondition, match="nvmet refused the key"):
        service.ControllerPublishVolume(request, FakeContext(remaining=30))  # type: ignore[arg-type]


def test_create_snapshot_of_a_volume_whose_snapshot_failed_is_mapped_and_leaves_no_cr() -> None:
    def react(plural: str, obj: dict[str, Any]) -> dict[str, Any] | None:
        return {"phase": api.AVAILABLE} if plural == api.VOLUMES else _failed(api.CODE_CAPACITY_EXHAUSTED, "full")

    service, fake = controller(react)
    create(service)
    request = csi_pb2.CreateSnapshotRequest(name="snapshot-1", source_volume_id=f"{NS}/pvc-1")
    with pytest.raises(ResourceExhausted, match="full"):
        service.CreateSnapshot(request, FakeContext())  # type: ignore[arg-type]
    assert fake.get(api.SNAPSHOTS, "snapshot-1", NS) is None


def test_create_snapshot_of_a_missing_volume_is_not_found() -> None:
    service, _ = controller()
    with pytest.raises(NotFound):
        service.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=f"{NS}/nope"),
                               FakeContext())  # type: ignore[arg-type]


# ------------------------------------------------------------ API failures -> codes


@pytest.mark.parametrize(("status", "expected"), [
    (403, PermissionDenied), (401, CsiError), (404, NotFound), (409, Aborted), (422, InvalidArgument),
    (429, Unavailable), (500, Unavailable), (503, Unavailable), (504, DeadlineExceeded), (None, Unavailable),
])
def test_api_exceptions_become_clear_codes(status: int | None, expected: type[CsiError]) -> None:
    error = csi_error(ApiException(status=status, reason="x"))
    assert isinstance(error, expected)
    if status in (401, 403, 429, 500, 503):
        assert error.code_name != "INTERNAL"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[csi_pb2_grpc.ControllerStub, FakeClusterApi]]:
    service, fake = controller(lambda plural, obj: {"phase": api.AVAILABLE})
    server = build_server(f"unix://{tmp_path}/csi.sock", max_workers=4)
    csi_pb2_grpc.add_ControllerServicer_to_server(service, server)
    server.start()
    channel = grpc.insecure_channel(f"unix://{tmp_path}/csi.sock")
    try:
        yield csi_pb2_grpc.ControllerStub(channel), fake
    finally:
        channel.close()
        server.stop(0)


def test_a_403_from_the_api_reaches_the_caller_as_permission_denied_not_an_internal_traceback(
        served: tuple[csi_pb2_grpc.ControllerStub, FakeClusterApi], caplog: pytest.LogCaptureFixture) -> None:
    stub, fake = served
    fake.failures["get"] = ApiException(status=403, reason="Forbidden")
    caplog.set_level(logging.INFO, logger="opensds_csi.server")
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateVolume(csi_pb2.CreateVolumeRequest(name="pvc-1", parameters={"profile": "p"},
                                                      volume_capabilities=[MOUNT]), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "403 Forbidden" in (err.value.details() or "")
    assert "Traceback" not in caplog.text


def test_an_unreachable_api_is_unavailable(served: tuple[csi_pb2_grpc.ControllerStub, FakeClusterApi]) -> None:
    stub, fake = served
    fake.failures["list"] = ApiException(status=0, reason="Connection refused")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetCapacity(csi_pb2.GetCapacityRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
