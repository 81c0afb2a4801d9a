"""Connectors by transport name (publish_context["transport"], the profile's accessProtocol)."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidArgument
from .base import Connector
from .iscsi import IscsiConnector
from .local import DEFAULT_LOCAL_ROOTS, LocalConnector
from .nvme_tcp import NvmeTcpConnector
from .rbd import RbdConnector

__all__ = ["DEFAULT_LOCAL_ROOTS", "Connector", "Connectors"]


class Connectors:
    """The connectors of one node (network transports connect with the node's own identity)."""

    def __init__(self, node_id: str, local_roots: Sequence[str] = DEFAULT_LOCAL_ROOTS) -> None:
        self._by_transport: dict[str, Connector] = {
            "local": LocalConnector(local_roots),
            "nvmeof-tcp": NvmeTcpConnector(node_id),
            "iscsi": IscsiConnector(node_id),
            "rbd": RbdConnector(),
        }

    def get(self, transport: str) -> Connector:
        try:
            return self._by_transport[transport]
        except KeyError:
            raise InvalidArgument(f"transport {transport!r} is not supported by this node plugin "
                                  f"(supported: {', '.join(sorted(self._by_transport))})") from None

    def identify(self, device: str) -> dict[str, str] | None:
        """The publish_context (transport included) that detaches `device`, from sysfs; None: not ours."""
        for connector in self._by_transport.values():
            found = connector.identify(device)
            if found:
                return found
        return None
