"""Names of our API: group, version, resources, finalizers, condition types."""
from __future__ import annotations

GROUP = "opensds.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

BACKENDS = "storagebackends"
PROFILES = "storageprofiles"
VOLUMES = "volumes"
SNAPSHOTS = "snapshots"

CSI_DRIVER_NAME = "block.csi.opensds.io"
# Topology key a node-local volume (accessProtocol local) is confined to; the CSI node
# plugin reports it in NodeGetInfo, so PVs get node affinity to their backend's node.
NODE_TOPOLOGY_KEY = "topology.block.csi.opensds.io/node"
NODE_LOCAL_PROTOCOLS = frozenset({"local"})
PROFILE_LABEL = "opensds.io/profile"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "opensds-operator"

# Finalizers: the operator guards profiles/backends in use, the dock guards backend objects.
OPERATOR_FINALIZER = "opensds.io/operator-protection"
DOCK_FINALIZER = "opensds.io/dock-protection"

# Volume phases (status.phase)
PENDING, CREATING, AVAILABLE, EXPANDING, DELETING, ERROR = (
    "Pending", "Creating", "Available", "Expanding", "Deleting", "Error",
)
TRANSITIONAL_PHASES = frozenset({PENDING, CREATING, EXPANDING, DELETING})

# Condition types
READY = "Ready"
SCHEDULED = "Scheduled"
IN_USE = "InUse"


def volume_backend_id(uid: str) -> str:
    """Backend name of a Volume: derived from its UID so a retry finds an earlier attempt's object."""
    return f"vol-{uid}"


def snapshot_backend_id(uid: str) -> str:
    return f"snap-{uid}"
