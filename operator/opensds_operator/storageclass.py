"""What a StorageProfile becomes in Kubernetes: a StorageClass and a VolumeSnapshotClass.

Both carry the operator's label (app.kubernetes.io/managed-by=opensds-operator); an object of
the same name without it belongs to someone else and is never changed or deleted (`is_managed`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .api import CSI_DRIVER_NAME, MANAGED_BY, MANAGED_BY_LABEL, NODE_LOCAL_PROTOCOLS, PROFILE_LABEL
from .credentials import node_stage_secret_ref

NODE_STAGE_SECRET_NAME = "csi.storage.k8s.io/node-stage-secret-name"
NODE_STAGE_SECRET_NAMESPACE = "csi.storage.k8s.io/node-stage-secret-namespace"


def is_managed(obj: Mapping[str, Any]) -> bool:
    """Whether the operator made this StorageClass / VolumeSnapshotClass (only those it may touch)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(MANAGED_BY_LABEL) == MANAGED_BY)


def is_topology_constrained(profile_spec: dict[str, Any]) -> bool:
    """Node-local volumes, or an explicit topology list, make binding wait for the pod's node."""
    return profile_spec.get("accessProtocol") in NODE_LOCAL_PROTOCOLS or bool(profile_spec.get("allowedTopologies"))


def storage_class(profile_name: str, profile_spec: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    """The StorageClass of a profile; `namespace` is where generated credentials live (credentials.py)."""
    sc: dict[str, Any] = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": profile_name,
            "labels": {PROFILE_LABEL: profile_name, MANAGED_BY_LABEL: MANAGED_BY},
        },
        "provisioner": CSI_DRIVER_NAME,
        "parameters": {
            "profile": profile_name,
            "csi.storage.k8s.io/fstype": profile_spec.get("fsType", "ext4"),
        },
        "reclaimPolicy": profile_spec.get("reclaimPolicy", "Delete"),
        "allowVolumeExpansion": bool(profile_spec.get("allowVolumeExpansion", True)),
        "volumeBindingMode": "WaitForFirstConsumer" if is_topology_constrained(profile_spec) else "Immediate",
    }
    secret = node_stage_secret_ref(profile_spec, namespace)
    if secret:  # kubelet reads it and hands it to NodeStageVolume; publish_context stays free of keys
        sc["parameters"][NODE_STAGE_SECRET_NAME] = secret["name"]
        sc["parameters"][NODE_STAGE_SECRET_NAMESPACE] = secret["namespace"]
    if profile_spec.get("allowedTopologies"):
        sc["allowedTopologies"] = [
            {"matchLabelExpressions": [{"key": k, "values": [v]} for k, v in sorted(seg.items())]}
            for seg in profile_spec["allowedTopologies"]
        ]
    return sc


def snapshot_class(profile_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotClass",
        "metadata": {
            "name": profile_name,
            "labels": {PROFILE_LABEL: profile_name, MANAGED_BY_LABEL: MANAGED_BY},
        },
        "driver": CSI_DRIVER_NAME,
        "deletionPolicy": "Delete",
        "parameters": {"profile": profile_name},
    }


IMMUTABLE_SC_FIELDS = ("provisioner", "parameters", "reclaimPolicy", "volumeBindingMode", "allowedTopologies")


def needs_recreate(existing: dict[str, Any], desired: dict[str, Any]) -> bool:
    """StorageClass parameters are immutable in Kubernetes: a change means delete + create."""
    return any(existing.get(f) != desired.get(f) for f in IMMUTABLE_SC_FIELDS)
