"""Connectors by transport name (publish_context["transport"])."""
from __future__ import annotations

from ..errors import InvalidArgument
from .base import Connector
from .local import LocalConnector

_CONNECTORS: dict[str, Connector] = {"local": LocalConnector()}


def connector_for(transport: str) -> Connector:
    try:
        return _CONNECTORS[transport]
    except KeyError:
        raise InvalidArgument(f"transport {transport!r} is not supported by this node plugin "
                              f"(supported: {', '.join(sorted(_CONNECTORS))})") from None
