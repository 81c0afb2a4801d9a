"""The node's connector interface: how a published volume becomes a local block device.

One implementation per transport named in publish_context["transport"]: `local` (loop
devices / local LVs) now; NVMe-oF/TCP, iSCSI and krbd slot in beside it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Connector(Protocol):
    def attach(self, volume_id: str, context: Mapping[str, str]) -> str:
        """Connect and return the block device; attaching an attached volume returns the same device."""
        ...

    def detach(self, volume_id: str, context: Mapping[str, str], device: str | None) -> None:
        """Disconnect; succeeds when the device has already vanished."""
        ...

    def refresh(self, device: str) -> None:
        """Make the kernel re-read the size after the backend grew the volume."""
        ...
