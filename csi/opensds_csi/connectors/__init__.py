"""Connectors by transport name (publish_context["transport"])."""
from __future__ import annotations

from ..errors import InvalidArgument
from .base import Connector
from .iscsi import IscsiConnector
from .local import LocalConnector
from .nvme_tcp import NvmeTcpConnector
from .rbd import RbdConnector


class Connectors:
    """The connectors of one node (network transports connect with the node's own identity)."""

    def __init__(self, node_id: str) -> None:
        self._by_transport: dict[str, Connector] = {
            "local": LocalConnector(),
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
