"""The contract shared by the operator, the dock and the CSI plugin, in one place.

Group, version, resources, finalizers, labels, phases and condition types of our API; the
publish_context keys the dock writes and the node reads; the node-stage Secret keys both
ends use; and the stable failure codes a dock or the operator records on a CR
(`status.code` + the Ready/Scheduled condition's reason) that the CSI controller relays
as gRPC codes. Nothing here imports anything: both sides can depend on it cheaply.
"""
from __future__ import annotations

import hashlib
import re

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
BACKEND_LABEL = "opensds.io/backend"
POOL_LABEL = "opensds.io/pool"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "opensds-operator"

# Finalizers: the operator guards profiles/backends in use, the dock guards backend objects.
OPERATOR_FINALIZER = "opensds.io/operator-protection"
DOCK_FINALIZER = "opensds.io/dock-protection"  # objects of docks older than dock_finalizer()


def dock_finalizer(backend: str) -> str:
    """The finalizer of the dock serving `backend`: each dock has its own.

    kopf removes its finalizer from every object none of its handlers match, so with one name
    shared by all docks each dock stripped the others' (their Volumes then failed the dock's
    guard and stayed Creating, or were deleted without their dock)."""
    if len(backend) <= 63:
        return f"dock.opensds.io/{backend}"
    return f"dock.opensds.io/{backend[:52]}-{hashlib.sha256(backend.encode()).hexdigest()[:10]}"

# Volume phases (status.phase)
PENDING, CREATING, AVAILABLE, EXPANDING, DELETING, ERROR = (
    "Pending", "Creating", "Available", "Expanding", "Deleting", "Error",
)
TRANSITIONAL_PHASES = frozenset({PENDING, CREATING, EXPANDING, DELETING})

# The largest Volume spec.size (1Pi): the CRD rejects more, the CSI controller answers OUT_OF_RANGE.
MAX_VOLUME_BYTES = 2**50

# Condition types
READY = "Ready"
SCHEDULED = "Scheduled"
IN_USE = "InUse"
NAME_CONFLICT = "NameConflict"

# ---------------------------------------------------------------- failure codes
# Recorded in status.code and as the condition reason; the CSI controller maps them to gRPC
# codes (csi/opensds_csi/controller.py), as TopoLVM relays LogicalVolume.status.code.
CODE_BACKEND_OBJECT_MISSING = "BackendObjectMissing"  # was made once, is gone now: never re-created
CODE_SOURCE_NOT_FOUND = "SourceNotFound"              # the snapshot/volume to copy from is missing
CODE_INVALID_PARAMETERS = "InvalidParameters"         # something a human must fix in a spec
CODE_PROFILE_NOT_FOUND = "ProfileNotFound"
CODE_CROSS_NAMESPACE_SOURCE = "CrossNamespaceSource"
CODE_UNSCHEDULABLE = "Unschedulable"                  # no pool fits (capacity or capabilities)
CODE_CAPACITY_EXHAUSTED = "CapacityExhausted"         # the chosen pool ran out of room
CODE_BACKEND_UNAVAILABLE = "BackendUnavailable"       # transient: retried with backoff
CODE_EXPORT_FAILED = "ExportFailed"                   # the target refused the export settings
CODE_PLACEMENT_INVALID = "PlacementInvalid"           # a pinned backend/pool fails the scheduler's checks

# ---------------------------------------------------------------- publish_context
# Written by the dock (drivers/exporters) into Volume.status.publishContext, read by the node.
CTX_TRANSPORT = "transport"   # names the node's connector: local, nvmeof-tcp, iscsi, rbd
CTX_PATH = "path"             # local: the backing file or device
CTX_NQN = "nqn"               # nvmeof-tcp
CTX_ADDRESSES = "addresses"
CTX_UUID = "uuid"             # nvmeof-tcp namespace UUID/NGUID (the Volume's UID)
CTX_IQN = "iqn"               # iscsi
CTX_PORTALS = "portals"
CTX_SERIAL = "serial"         # iscsi unit serial (the Volume's UID)
CTX_AUTH = "auth"             # dhchap, dhchap-bidirectional, chap, chap-mutual; absent: none
CTX_POOL, CTX_IMAGE, CTX_MONITORS = "pool", "image", "monitors"  # rbd

# ---------------------------------------------------------------- volume_context
# Written by the CSI controller at CreateVolume (kept in the PV), read by the node to check that
# publish_context names this very volume (its UID) through its profile's transport.
VC_ACCESS_PROTOCOL = "accessProtocol"
VC_VOLUME_UID = "volumeUID"

# ---------------------------------------------------------------- node-stage Secret keys
# The Secret a profile names in nodeStageSecretRef: kubelet hands it to the node (NodeStage
# secrets) and the dock reads the same Secret to configure the target.
DHCHAP_HOST_KEY = "dhchapHostKey"  # DH-HMAC-CHAP secret (DHHC-1:..) hosts prove themselves with
DHCHAP_CTRL_KEY = "dhchapCtrlKey"  # optional: the controller proves itself too (bidirectional)
CHAP_USER, CHAP_PASSWORD = "chapUser", "chapPassword"
CHAP_MUTUAL_USER, CHAP_MUTUAL_PASSWORD = "chapMutualUser", "chapMutualPassword"
RBD_USER_ID, RBD_USER_KEY = "userID", "userKey"

# ---------------------------------------------------------------- names

# A Kubernetes node name (DNS-1123 subdomain); published node names become configfs
# directory names and NQN/IQN suffixes, so nothing else may pass.
NODE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_NODE_NAME = re.compile(NODE_NAME_PATTERN)
UID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_UID = re.compile(UID_PATTERN)


def valid_node_name(name: str) -> bool:
    return len(name) <= 253 and bool(_NODE_NAME.match(name))


def valid_uid(uid: str) -> bool:
    return bool(_UID.match(uid))


def volume_backend_id(uid: str) -> str:
    """Backend name of a Volume: derived from its UID so a retry finds an earlier attempt's object."""
    return f"vol-{uid}"


def snapshot_backend_id(uid: str) -> str:
    return f"snap-{uid}"
