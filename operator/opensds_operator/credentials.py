"""Generated node-stage credentials: what a network export authenticates with when its profile
names no Secret (nodeStageSecretRef) and has not opted out (spec.unauthenticatedExports).

Without credentials any initiator that claims a published node's NQN/IQN gets the volume, so
network profiles (nvmeof-tcp, iscsi) are authenticated by default: the operator generates one
Secret with a DH-HMAC-CHAP host and controller key and a CHAP pair each way, the StorageClass
names it as the node-stage secret (kubelet hands it to NodeStageVolume), and the dock gives the
same keys to the target.

One Secret per operator namespace, shared by every such profile, rather than one per profile:
nvmet keeps a DH-HMAC-CHAP key per *host* entry, shared by all subsystems of a target (see
exports/nvmet.py), so two profiles with different keys, served by one backend to the same node,
would overwrite that node's key in turn and lock it out of one profile's volumes. Per-node or
per-volume keys cannot be expressed either: kubelet resolves a StorageClass's node-stage secret
from PV/PVC names only. What this buys: initiators that are not cluster nodes (anything else on
the storage network) cannot attach. What it does not: a node that holds the Secret can claim
another node's identity (README: what a compromised node can do).

The Secret is made once and never rewritten by the operator (a rewrite would rotate every
target's keys under attached nodes); deleting it makes the operator generate a new one.
"""
from __future__ import annotations

import base64
import os
import secrets
import string
import zlib
from collections.abc import Mapping
from typing import Any

from .api import (
    CHAP_MUTUAL_PASSWORD,
    CHAP_MUTUAL_USER,
    CHAP_PASSWORD,
    CHAP_USER,
    DHCHAP_CTRL_KEY,
    DHCHAP_HOST_KEY,
    MANAGED_BY,
    MANAGED_BY_LABEL,
)

SECRET_NAME = "opensds-node-stage-credentials"
NETWORK_PROTOCOLS = frozenset({"nvmeof-tcp", "iscsi"})
DHCHAP_KEY_BYTES = (32, 48, 64)  # the lengths NVMe allows for a secret used as is (hash id 00)
_CHAP_ALPHABET = string.ascii_letters + string.digits  # nothing an initiator's config file or CLI would mangle


def credentials_namespace() -> str:
    """Where the generated Secret lives: the namespace the operator and the docks run in."""
    return os.environ.get("POD_NAMESPACE", "opensds-system")


def dhchap_secret(length: int = 32) -> str:
    """A DH-HMAC-CHAP secret in the representation `nvme gen-dhchap-key` prints and the kernel parses:
    `DHHC-1:00:<base64(key || CRC-32(key) as 4 little-endian bytes)>:`. "00" means the key is used
    as is (no HMAC transformation with the host NQN), which allows 32, 48 or 64 random bytes."""
    if length not in DHCHAP_KEY_BYTES:
        raise ValueError(f"DH-HMAC-CHAP keys are {DHCHAP_KEY_BYTES} bytes long, not {length}")
    key = secrets.token_bytes(length)
    encoded = base64.b64encode(key + zlib.crc32(key).to_bytes(4, "little")).decode()
    return f"DHHC-1:00:{encoded}:"


def dhchap_secret_valid(value: str) -> bool:
    """Whether `value` is a hash-id-00 DHHC-1 secret whose CRC-32 trailer matches (what the kernel checks)."""
    parts = value.split(":")
    if len(parts) != 4 or parts[0] != "DHHC-1" or parts[1] != "00" or parts[3] != "":
        return False
    try:
        raw = base64.b64decode(parts[2], validate=True)
    except ValueError:
        return False
    key, trailer = raw[:-4], raw[-4:]
    return len(key) in DHCHAP_KEY_BYTES and zlib.crc32(key).to_bytes(4, "little") == trailer


def chap_secret(length: int = 24) -> str:
    """A CHAP password: 24 alphanumerics are ~142 random bits (RFC 7143 asks for at least 96)."""
    return "".join(secrets.choice(_CHAP_ALPHABET) for _ in range(length))


def generate_node_stage_secret() -> dict[str, str]:
    """Fresh keys for both network protocols, both directions (nodes also verify the target)."""
    return {
        DHCHAP_HOST_KEY: dhchap_secret(),
        DHCHAP_CTRL_KEY: dhchap_secret(),
        CHAP_USER: "opensds-node",
        CHAP_PASSWORD: chap_secret(),
        CHAP_MUTUAL_USER: "opensds-target",
        CHAP_MUTUAL_PASSWORD: chap_secret(),
    }


def authenticated_by_default(profile_spec: Mapping[str, Any]) -> bool:
    return (profile_spec.get("accessProtocol") in NETWORK_PROTOCOLS and not profile_spec.get("nodeStageSecretRef")
            and not profile_spec.get("unauthenticatedExports"))


def node_stage_secret_ref(profile_spec: Mapping[str, Any], namespace: str | None = None) -> dict[str, str] | None:
    """The Secret a profile's nodes attach with and its targets require: the profile's own, else the
    generated one for a network profile that did not opt out, else none. The operator (StorageClass)
    and the dock (target) both ask this, so they cannot disagree."""
    explicit = profile_spec.get("nodeStageSecretRef")
    if explicit:
        return {"name": str(explicit["name"]), "namespace": str(explicit["namespace"])}
    if authenticated_by_default(profile_spec):
        return {"name": SECRET_NAME, "namespace": namespace or credentials_namespace()}
    return None


def generated_secret_body(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET_NAME, "namespace": namespace, "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
        "type": "Opaque",
        "stringData": generate_node_stage_secret(),
    }
