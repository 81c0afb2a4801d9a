"""The exporter interface and the names both ends derive (so the node plugin needs no API access)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..api import (
    CHAP_MUTUAL_PASSWORD,
    CHAP_MUTUAL_USER,
    CHAP_PASSWORD,
    CHAP_USER,
    DHCHAP_CTRL_KEY,
    DHCHAP_HOST_KEY,
    valid_node_name,
)
from ..drivers.base import PermanentDriverError

NQN_PREFIX = "nqn.2024-11.io.opensds"


def _checked_node(node: str) -> str:
    """A node name that is safe as a configfs directory name and an NQN/IQN suffix.

    Node names come from Volume.spec.publishedNodes (and the CSI node id): the exporters
    mkdir them under /sys/kernel/config as root, so `x/../../tmp/PWNED` would make a
    directory anywhere. Only Kubernetes node names (DNS-1123 subdomains) pass.
    """
    if not valid_node_name(node):
        raise PermanentDriverError(f"node name {node[:80]!r} is not a Kubernetes node name (DNS-1123 subdomain: "
                                   f"lowercase letters, digits, '-' and '.')")
    return node


def node_host_nqn(node: str) -> str:
    """The host NQN a node connects with: derived from its node id, the same on both ends."""
    return f"{NQN_PREFIX}:node:{_checked_node(node)}"


def volume_nqn(backend_id: str) -> str:
    return f"{NQN_PREFIX}:{backend_id}"


class Exporter(Protocol):
    protocol: str

    def export(self, backend_id: str, device: str, uuid: str, nodes: Sequence[str],
               auth: ExportAuth | None = None) -> dict[str, str]:
        """Converge the export of `device` to admit exactly `nodes` (authenticated when `auth` has
        this protocol's credentials); returns the publish_context."""
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
    return f"{IQN_PREFIX}:node:{_checked_node(node)}"


def volume_iqn(backend_id: str) -> str:
    return f"{IQN_PREFIX}:{backend_id}"


@dataclass(frozen=True)
class ExportAuth:
    """Target-side credentials; repr() never shows them (they must not reach logs or events)."""

    dhchap_host_key: str = field(default="", repr=False)
    dhchap_ctrl_key: str = field(default="", repr=False)
    chap_user: str = ""
    chap_password: str = field(default="", repr=False)
    chap_mutual_user: str = ""
    chap_mutual_password: str = field(default="", repr=False)

    @classmethod
    def from_secret(cls, data: Mapping[str, str]) -> ExportAuth:
        return cls(data.get(DHCHAP_HOST_KEY, ""), data.get(DHCHAP_CTRL_KEY, ""), data.get(CHAP_USER, ""),
                   data.get(CHAP_PASSWORD, ""), data.get(CHAP_MUTUAL_USER, ""), data.get(CHAP_MUTUAL_PASSWORD, ""))

    def missing(self, protocol: str) -> list[str]:
        """Secret keys `protocol` needs that are absent (names only: never the values)."""
        if protocol == "nvmeof-tcp":
            return [] if self.dhchap_host_key else [DHCHAP_HOST_KEY]
        if protocol == "iscsi":
            wanted = {CHAP_USER: self.chap_user, CHAP_PASSWORD: self.chap_password}
            if self.chap_mutual_user or self.chap_mutual_password:  # half a mutual pair is a typo, not "off"
                wanted.update({CHAP_MUTUAL_USER: self.chap_mutual_user,
                               CHAP_MUTUAL_PASSWORD: self.chap_mutual_password})
            return [key for key, value in wanted.items() if not value]
        return []

    def require(self, protocol: str, source: str = "the node-stage Secret") -> ExportAuth:
        """Fail closed: a Secret that is meant to authenticate `protocol` but lacks its keys is an
        error a human must fix, never a reason to export without authentication."""
        if missing := self.missing(protocol):
            raise PermanentDriverError(f"{source} lacks {', '.join(missing)}, needed for authenticated "
                                       f"{protocol} exports; add them (or set the profile's "
                                       f"unauthenticatedExports: true to export without authentication)")
        return self
