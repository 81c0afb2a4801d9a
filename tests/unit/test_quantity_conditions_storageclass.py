"""Quantities, conditions and profile -> StorageClass mapping."""
from __future__ import annotations

import pytest

from opensds_operator.conditions import get_condition, set_condition
from opensds_operator.quantity import format_bytes, parse_bytes
from opensds_operator.storageclass import is_topology_constrained, needs_recreate, storage_class


@pytest.mark.parametrize(("text", "expected"), [
    ("1Gi", 2**30), ("10Mi", 10 * 2**20), ("1G", 10**9), ("1.5Gi", 3 * 2**29), ("123", 123), ("1500m", 2),
])
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a quantity"):
        parse_bytes("ten gigs")


def test_format_bytes() -> None:
    assert (format_bytes(2**30), format_bytes(3 * 2**29), format_bytes(5)) == ("1Gi", "1.5Gi", "5")


def test_condition_transition_time_moves_only_when_status_changes() -> None:
    first = set_condition(None, "Ready", False, "Creating", "working")
    again = set_condition(first, "Ready", False, "Creating", "still working")
    assert get_condition(again, "Ready")["lastTransitionTime"] == get_condition(first, "Ready")["lastTransitionTime"]
    assert get_condition(again, "Ready")["message"] == "still working"
    flipped = set_condition(again, "Ready", True, "Available")
    assert get_condition(flipped, "Ready")["status"] == "True"
    assert len(flipped) == 1


def test_local_profile_binds_on_first_consumer() -> None:
    local = {"storageType": "block", "accessProtocol": "local"}
    network = {"storageType": "block", "accessProtocol": "iscsi"}
    assert is_topology_constrained(local) and not is_topology_constrained(network)
    assert storage_class("gold", local)["volumeBindingMode"] == "WaitForFirstConsumer"
    assert storage_class("gold", network)["volumeBindingMode"] == "Immediate"
    zoned = {**network, "allowedTopologies": [{"zone": "a"}]}
    sc = storage_class("gold", zoned)
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["allowedTopologies"] == [{"matchLabelExpressions": [{"key": "zone", "values": ["a"]}]}]


def test_storage_class_carries_profile_and_driver() -> None:
    sc = storage_class("gold", {"storageType": "block", "accessProtocol": "local", "fsType": "xfs",
                                "allowVolumeExpansion": False, "reclaimPolicy": "Retain"})
    assert sc["provisioner"] == "block.csi.opensds.io"
    assert sc["parameters"] == {"profile": "gold", "csi.storage.k8s.io/fstype": "xfs"}
    assert (sc["allowVolumeExpansion"], sc["reclaimPolicy"]) == (False, "Retain")


def test_parameter_change_needs_recreate_but_expansion_flag_does_not() -> None:
    base = storage_class("p", {"storageType": "block", "accessProtocol": "local"})
    assert not needs_recreate(base, {**base, "allowVolumeExpansion": False})
    assert needs_recreate(base, storage_class("p", {"storageType": "block", "accessProtocol": "local",
                                                    "fsType": "xfs"}))


def test_node_stage_secret_becomes_the_storage_class_node_stage_parameters() -> None:
    sc = storage_class("ceph", {"storageType": "block", "accessProtocol": "rbd",
                                "nodeStageSecretRef": {"name": "ceph-node", "namespace": "opensds-system"}})
    assert sc["parameters"]["csi.storage.k8s.io/node-stage-secret-name"] == "ceph-node"
    assert sc["parameters"]["csi.storage.k8s.io/node-stage-secret-namespace"] == "opensds-system"
    plain = storage_class("p", {"storageType": "block", "accessProtocol": "local"})
    assert not any("secret" in key for key in plain["parameters"])
