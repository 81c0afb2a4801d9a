"""Exports: how a dock makes a backend device reachable over the network by exactly the
nodes a volume is published to (NVMe-oF/TCP via the kernel's nvmet; iSCSI via LIO next)."""
from __future__ import annotations

import ipaddress
from typing import Any

from ..drivers import parameters
from ..drivers.base import PermanentDriverError
from .base import Exporter


def parse_addresses(value: str) -> list[tuple[str, int]]:
    """"10.0.2.15:4420,10.0.3.15:4420" -> [(ip, port), ...].

    The address becomes a configfs directory name and a target portal, so only a literal
    IPv4 address and a port 1..65535 pass (what the CRD enforces, checked again for objects
    stored before it did)."""
    found = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        host, sep, port = item.rpartition(":")
        try:
            ipaddress.IPv4Address(host)
            valid = bool(sep) and port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535
        except ValueError:
            valid = False
        if not valid:
            raise PermanentDriverError(f"target address {item!r} is not <ipv4>:<port> with a port 1..65535")
        found.append((host, int(port)))
    return found


def make_exporters(spec: dict[str, Any]) -> dict[str, Exporter]:
    """Exporters by accessProtocol, from StorageBackend.spec.parameters (nvmeofAddresses, iscsiPortals)."""
    params = parameters(spec)
    exporters: dict[str, Exporter] = {}
    if params.get("nvmeofAddresses"):
        from .nvmet import NvmetExporter

        exporters["nvmeof-tcp"] = NvmetExporter(parse_addresses(params["nvmeofAddresses"]))
    if params.get("iscsiPortals"):
        from .lio import LioExporter

        exporters["iscsi"] = LioExporter(parse_addresses(params["iscsiPortals"]))
    return exporters
