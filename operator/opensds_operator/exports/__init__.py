"""Exports: how a dock makes a backend device reachable over the network by exactly the
nodes a volume is published to (NVMe-oF/TCP via the kernel's nvmet; iSCSI via LIO next)."""
from __future__ import annotations

from typing import Any

from ..drivers.base import PermanentDriverError
from .base import Exporter


def parse_addresses(value: str) -> list[tuple[str, int]]:
    """"10.0.2.15:4420,10.0.3.15:4420" -> [(ip, port), ...]."""
    found = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise PermanentDriverError(f"target address {item!r} is not <ipv4>:<port>")
        found.append((host, int(port)))
    return found


def make_exporters(spec: dict[str, Any]) -> dict[str, Exporter]:
    """Exporters by accessProtocol, from StorageBackend.spec.parameters (nvmeofAddresses, iscsiPortals)."""
    params: dict[str, str] = dict(spec.get("parameters", {}) or {})
    exporters: dict[str, Exporter] = {}
    if params.get("nvmeofAddresses"):
        from .nvmet import NvmetExporter

        exporters["nvmeof-tcp"] = NvmetExporter(parse_addresses(params["nvmeofAddresses"]))
    if params.get("iscsiPortals"):
        from .lio import LioExporter

        exporters["iscsi"] = LioExporter(parse_addresses(params["iscsiPortals"]))
    return exporters
