"""Fuzz: every CSI request is accepted or refused with a CSI-prescribed gRPC code.

The controller runs against the injected in-memory API (fake_cluster) with a random outcome
recorded by the "operator/dock" (Available, each failure code, or nothing yet); the node
service gets requests whose paths stay inside an empty temporary directory and whose
transport no connector serves, so only its argument validation runs (nothing is attached or
mounted). Zero INTERNAL answers and zero unhandled exceptions, whatever the input.
"""
from __future__ import annotations

import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opensds_csi.controller import ControllerService
from opensds_csi.errors import csi_error
from opensds_csi.identity import DRIVER_NAME
from opensds_csi.node import NodeService
from opensds_csi.proto import csi_pb2
from opensds_csi.store import ObjectStore
from opensds_operator import api

from .fake_cluster import FakeClusterApi, FakeContext

NS = "opensds-system"
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
AccessMode = csi_pb2.VolumeCapability.AccessMode

# What the CSI spec lets each call answer (besides OK); UNAVAILABLE/DEADLINE_EXCEEDED/ABORTED
# are always allowed (retry later), INTERNAL never.
RETRY = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"}
ALLOWED: dict[str, set[str]] = {
    "CreateVolume": {"INVALID_ARGUMENT", "ALREADY_EXISTS", "NOT_FOUND", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED",
                     "FAILED_PRECONDITION"},
    "DeleteVolume": {"INVALID_ARGUMENT", "FAILED_PRECONDITION"},
    "ControllerPublishVolume": {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION",
                                "RESOURCE_EXHAUSTED"},
    "ControllerUnpublishVolume": {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"},
    "ValidateVolumeCapabilities": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "ListVolumes": {"INVALID_ARGUMENT"},
    "ControllerGetVolume": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "GetCapacity": {"INVALID_ARGUMENT"},
    "ControllerExpandVolume": {"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                               "RESOURCE_EXHAUSTED"},
    "CreateSnapshot": {"INVALID_ARGUMENT", "ALREADY_EXISTS", "NOT_FOUND", "RESOURCE_EXHAUSTED",
                       "FAILED_PRECONDITION"},
    "DeleteSnapshot": {"INVALID_ARGUMENT", "FAILED_PRECONDITION"},
    "GetSnapshot": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "ListSnapshots": {"INVALID_ARGUMENT"},
    "NodeStageVolume": {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION"},
    "NodeUnstageVolume": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "NodePublishVolume": {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION"},
    "NodeUnpublishVolume": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "NodeGetVolumeStats": {"INVALID_ARGUMENT", "NOT_FOUND"},
    "NodeExpandVolume": {"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION"},
}

# ------------------------------------------------------------ strategies

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
names = st.one_of(st.sampled_from(["", "pvc-1", "vol-a", "snap-a", "UPPER", "a" * 64, "x/y", "sanity-name 1"]),
                  st.sampled_from(["pvc-1", "pvc-2"]), text)
ids = st.one_of(st.sampled_from([f"{NS}/vol-a", f"{NS}/snap-a", f"{NS}/pvc-1", "other-ns/vol-a", f"{NS}/nope",
                                 "", "/", "a/b/c", f"{NS}/UPPER"]), st.just(f"{NS}/vol-a"), text)
node_ids = st.one_of(st.sampled_from(["n1", "n2", "", "x/../../tmp/PWNED", "N1", "a" * 300]), st.just("n1"), text)
int64 = st.one_of(st.sampled_from([0, 1, -1, 1 << 20, 1 << 30, api.MAX_VOLUME_BYTES, api.MAX_VOLUME_BYTES + 1,
                                   2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
string_maps = st.dictionaries(text, text, max_size=3)


@st.composite
def capabilities(draw: st.DrawFn) -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability(access_mode=AccessMode(mode=draw(st.integers(0, 7))))
    kind = draw(st.sampled_from(["block", "mount", "none"]))
    if kind == "block":
        cap.block.SetInParent()
    elif kind == "mount":
        cap.mount.fs_type = draw(st.one_of(st.sampled_from(["", "ext4", "xfs", "btrfs"]), text))
        cap.mount.mount_flags.extend(draw(st.lists(text, max_size=2)))
    return cap


GOOD_CAPABILITIES = [
    csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs),
                             access_mode=AccessMode(mode=mode))
    for fs in ("", "ext4", "xfs") for mode in (AccessMode.SINGLE_NODE_WRITER, AccessMode.MULTI_NODE_MULTI_WRITER)
] + [csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                              access_mode=AccessMode(mode=AccessMode.SINGLE_NODE_WRITER))]
# Half well-formed, so the calls get past validation to the waits, the API and the failure table.
any_capability = st.one_of(st.sampled_from(GOOD_CAPABILITIES), capabilities())
capability_lists = st.one_of(st.lists(st.sampled_from(GOOD_CAPABILITIES), min_size=1, max_size=2),
                             st.lists(capabilities(), max_size=3))
capacity_ranges = st.builds(csi_pb2.CapacityRange, required_bytes=int64, limit_bytes=int64)
parameters = st.one_of(st.sampled_from([{"profile": "p"}, {"profile": "m"}, {"profile": "f"}, {"profile": "gone"},
                                        {}]), st.just({"profile": "p"}), st.just({"profile": "m"}),
                       st.dictionaries(st.just("profile"), text, max_size=1), string_maps)


@st.composite
def content_sources(draw: st.DrawFn) -> csi_pb2.VolumeContentSource | None:
    kind = draw(st.sampled_from(["none", "snapshot", "volume", "empty"]))
    if kind == "snapshot":
        return csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=draw(ids)))
    if kind == "volume":
        return csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=draw(ids)))
    return csi_pb2.VolumeContentSource() if kind == "empty" else None


topologies = st.lists(st.builds(csi_pb2.Topology, segments=string_maps), max_size=2)


@st.composite
def controller_requests(draw: st.DrawFn) -> tuple[str, Any]:
    method = draw(st.sampled_from([m for m in ALLOWED if not m.startswith("Node")]))
    if method == "CreateVolume":
        request = csi_pb2.CreateVolumeRequest(
            name=draw(names), parameters=draw(parameters), volume_capabilities=draw(capability_lists),
            secrets=draw(string_maps),
            accessibility_requirements=csi_pb2.TopologyRequirement(requisite=draw(topologies),
                                                                   preferred=draw(topologies)))
        if draw(st.booleans()):
            request.capacity_range.CopyFrom(draw(capacity_ranges))
        source = draw(content_sources())
        if source is not None:
            request.volume_content_source.CopyFrom(source)
    elif method in ("DeleteVolume", "ControllerGetVolume"):
        request = getattr(csi_pb2, f"{method}Request")(volume_id=draw(ids))
    elif method in ("ControllerPublishVolume", "ControllerUnpublishVolume"):
        request = getattr(csi_pb2, f"{method}Request")(volume_id=draw(ids), node_id=draw(node_ids))
        if method == "ControllerPublishVolume" and draw(st.booleans()):
            request.volume_capability.CopyFrom(draw(any_capability))
            request.readonly = draw(st.booleans())
    elif method == "ValidateVolumeCapabilities":
        request = csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=draw(ids), volume_capabilities=draw(capability_lists), parameters=draw(parameters))
    elif method in ("ListVolumes", "ListSnapshots"):
        request = getattr(csi_pb2, f"{method}Request")(
            max_entries=draw(st.integers(-(2**31), 2**31 - 1)),
            starting_token=draw(st.one_of(st.sampled_from(["", "after:vol-a", "after:"]), text)))
        if method == "ListSnapshots":
            request.snapshot_id, request.source_volume_id = draw(st.one_of(st.just(""), ids)), draw(
                st.one_of(st.just(""), ids))
    elif method == "GetCapacity":
        request = csi_pb2.GetCapacityRequest(volume_capabilities=draw(capability_lists), parameters=draw(parameters))
        if draw(st.booleans()):
            request.accessible_topology.segments.update(draw(string_maps))
    elif method == "ControllerExpandVolume":
        request = csi_pb2.ControllerExpandVolumeRequest(volume_id=draw(ids))
        if draw(st.booleans()):
            request.capacity_range.CopyFrom(draw(capacity_ranges))
        if draw(st.booleans()):
            request.volume_capability.CopyFrom(draw(any_capability))
    elif method == "CreateSnapshot":
        request = csi_pb2.CreateSnapshotRequest(name=draw(names), source_volume_id=draw(ids),
                                                parameters=draw(string_maps))
    else:  # DeleteSnapshot, GetSnapshot
        request = getattr(csi_pb2, f"{method}Request")(snapshot_id=draw(ids))
    return method, request


# What the operator/dock record after a write: done, each failure code, or nothing yet.
OUTCOMES: list[dict[str, Any] | None] = [
    None, {"phase": api.AVAILABLE, "capacityBytes": 1 << 40, "publishedNodes": ["n1", "n2"],
           "publishContext": {"transport": "local"}, "readyToUse": True, "sizeBytes": 1 << 20},
    *({"phase": api.ERROR, "code": code,
       "conditions": [{"type": api.READY, "status": "False", "reason": code, "message": "fuzzed"}]}
      for code in (v for k, v in sorted(vars(api).items()) if k.startswith("CODE_"))),
    {"phase": api.ERROR},
]


def world(outcome: dict[str, Any] | None) -> ControllerService:
    store = ObjectStore(NS)
    fake = FakeClusterApi(store, lambda plural, obj: outcome)
    fake.add(api.PROFILES, {"metadata": {"name": "p"}, "spec": {"storageType": "block", "accessProtocol": "local"}})
    fake.add(api.PROFILES, {"metadata": {"name": "m"}, "spec": {
        "storageType": "block", "accessProtocol": "nvmeof-tcp", "provisioning": {"multiAttach": True}}})
    fake.add(api.PROFILES, {"metadata": {"name": "f"}, "spec": {"storageType": "file", "accessProtocol": "nfs"}})
    fake.add(api.BACKENDS, {"metadata": {"name": "b"}, "spec": {"driver": "file", "nodeName": "n1"}, "status": {
        "lastProbeTime": "2026-01-01T00:00:00Z",
        "conditions": [{"type": "Ready", "status": "True"}],
        "pools": [{"name": "default", "totalBytes": 1 << 40, "freeBytes": 1 << 39,
                   "capabilities": {"storageTypes": ["block"], "thin": True, "protocols": ["local"]}}]}})
    fake.add(api.VOLUMES, {"metadata": {"name": "vol-a", "annotations": {"opensds.io/csi-name": "vol-a"}},
                           "spec": {"size": "1Gi", "profile": "p", "backend": "b", "pool": "default",
                                    "publishedNodes": ["n1"]},
                           "status": {"phase": api.AVAILABLE, "capacityBytes": 1 << 30,
                                      "publishedNodes": ["n1"], "publishContext": {"transport": "local"}}}, NS)
    fake.add(api.SNAPSHOTS, {"metadata": {"name": "snap-a", "annotations": {"opensds.io/csi-name": "snap-a"}},
                             "spec": {"volumeName": "vol-a"}, "status": {"readyToUse": True, "sizeBytes": 1 << 30}},
                             NS)
    fake.csi_nodes["n1"] = {DRIVER_NAME: "n1"}
    fake.csi_nodes["n2"] = {DRIVER_NAME: "n2"}
    return ControllerService(store, wait_timeout=0.05, api=fake)


def outcome_of(call: Callable[[Any, Any], Any], request: Any) -> str:
    """The gRPC code the interceptor would answer with; an INTERNAL answer fails with its traceback."""
    try:
        call(request, FakeContext(remaining=None))
    except Exception as e:
        error = csi_error(e)
        assert error.code_name != "INTERNAL", "".join(traceback.format_exception(e))
        return error.code_name
    return "OK"


@FUZZ
@given(controller_requests(), st.sampled_from(OUTCOMES))
def test_every_controller_request_gets_ok_or_a_csi_prescribed_code(
        call: tuple[str, Any], outcome: dict[str, Any] | None) -> None:
    method, request = call
    service = world(outcome)
    code = outcome_of(getattr(service, method), request)
    assert code == "OK" or code in ALLOWED[method] | RETRY, f"{method} answered {code}"


# ------------------------------------------------------------ node


@st.composite
def node_requests(draw: st.DrawFn, root: Path) -> tuple[str, Any]:
    """Node requests whose paths stay inside `root` (empty) and whose transport nothing serves."""
    method = draw(st.sampled_from([m for m in ALLOWED if m.startswith("Node")]))
    path = st.one_of(st.just(""), st.builds(lambda s: str(root / s), st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=20).filter(
        lambda s: s not in (".", ".."))))
    volume_id = draw(st.one_of(ids, names))
    context = draw(string_maps)
    context["transport"] = "fuzz-" + draw(text)
    fields: dict[str, Any] = {"volume_id": volume_id}
    if method == "NodeStageVolume":
        fields |= {"staging_target_path": draw(path), "publish_context": context, "secrets": draw(string_maps),
                   "volume_context": draw(string_maps)}
    elif method == "NodeUnstageVolume":
        fields |= {"staging_target_path": draw(path)}
    elif method == "NodePublishVolume":
        fields |= {"staging_target_path": draw(path), "target_path": draw(path), "readonly": draw(st.booleans()),
                   "publish_context": context, "volume_context": draw(string_maps)}
    elif method == "NodeUnpublishVolume":
        fields |= {"target_path": draw(path)}
    elif method == "NodeGetVolumeStats":
        fields |= {"volume_path": draw(path)}
    else:
        fields |= {"volume_path": draw(path)}
    request = getattr(csi_pb2, f"{method}Request")(**fields)
    if method in ("NodeStageVolume", "NodePublishVolume", "NodeExpandVolume") and draw(st.booleans()):
        request.volume_capability.CopyFrom(draw(any_capability))
    if method == "NodeExpandVolume" and draw(st.booleans()):
        request.capacity_range.CopyFrom(draw(capacity_ranges))
    return method, request


ROOT = Path(tempfile.mkdtemp(prefix="opensds-fuzz-node-"))


@FUZZ
@given(node_requests(ROOT))
def test_every_node_request_with_bad_arguments_gets_a_csi_prescribed_code(call: tuple[str, Any]) -> None:
    method, request = call
    with tempfile.TemporaryDirectory() as state:
        service = NodeService("n1", {"topology.block.csi.opensds.io/node": "n1"}, state)
        code = outcome_of(getattr(service, method), request)
    assert code == "OK" or code in ALLOWED[method] | RETRY, f"{method} answered {code}"
    assert not any(ROOT.iterdir()), "the node touched the filesystem for a request it should refuse"
