"""The exporter interface and the names both ends derive (so the node plugin needs no API access)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

NQN_PREFIX = "nqn.2024-11.io.opensds"


def node_host_nqn(node: str) -> str:
    """The host NQN a node connects with: derived from its node id, the same on both ends."""
    return f"{NQN_PREFIX}:node:{node}"


def volume_nqn(backend_id: str) -> str:
    return f"{NQN_PREFIX}:{backend_id}"


class Exporter(Protocol):
    protocol: str

    def export(self, backend_id: str, device: str, uuid: str, nodes: Sequence[str]) -> dict[str, str]:
        """Converge the export of `device` to admit exactly `nodes`; returns the publish_context."""
        ...

    def resize(self, backend_id: str) -> None:
        """Tell the target the device grew (connected hosts then see the new size)."""
        ...

    def unexport(self, backend_id: str) -> None:
        """Remove the export entirely (idempotent)."""
        ...

    def exported(self) -> list[str]:
        """Backend ids with an export (for the orphan sweep)."""
        ...


IQN_PREFIX = "iqn.2024-11.io.opensds"


def node_iqn(node: str) -> str:
    """The iSCSI initiator name a node logs in with: derived from its node id, like its NQN."""
    return f"{IQN_PREFIX}:node:{node}"


def volume_iqn(backend_id: str) -> str:
    return f"{IQN_PREFIX}:{backend_id}"
