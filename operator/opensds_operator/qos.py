"""A volume's I/O limits from its StorageProfile, as the node and the backends apply them.

`provisioning.maxIOPS` / `maxBWS` are absolute caps; `iopsPerGiB` / `bwsPerGiB` scale with
the volume's size (rounded up to whole GiB). When both are set the lower wins. The dock puts
the result into publish_context (`maxIOPS`, `maxBPS`), so the node enforces it with no API
access, and a backend with native QoS (RBD) applies the same numbers.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GiB = 2**30
MAX_IOPS_KEY = "maxIOPS"
MAX_BPS_KEY = "maxBPS"


@dataclass(frozen=True)
class IoLimits:
    iops: int | None = None
    bps: int | None = None

    def __bool__(self) -> bool:
        return self.iops is not None or self.bps is not None

    def as_context(self) -> dict[str, str]:
        """publish_context entries (absent when unlimited)."""
        context = {}
        if self.iops is not None:
            context[MAX_IOPS_KEY] = str(self.iops)
        if self.bps is not None:
            context[MAX_BPS_KEY] = str(self.bps)
        return context

    @classmethod
    def from_context(cls, context: Mapping[str, str]) -> IoLimits:
        """Read back what `as_context` wrote; anything not a positive integer means unlimited."""
        def positive(key: str) -> int | None:
            value = context.get(key, "")
            return int(value) if value.isdigit() and int(value) > 0 else None
        return cls(positive(MAX_IOPS_KEY), positive(MAX_BPS_KEY))


def _cap(absolute: Any, per_gib: Any, size_bytes: int) -> int | None:
    candidates = []
    if absolute:
        candidates.append(int(absolute))
    if per_gib:
        candidates.append(int(per_gib) * max(1, -(-size_bytes // GiB)))
    return min(candidates) if candidates else None


def volume_limits(profile_spec: Mapping[str, Any], size_bytes: int) -> IoLimits:
    provisioning = profile_spec.get("provisioning") or {}
    return IoLimits(
        iops=_cap(provisioning.get("maxIOPS"), provisioning.get("iopsPerGiB"), size_bytes),
        bps=_cap(provisioning.get("maxBWS"), provisioning.get("bwsPerGiB"), size_bytes),
    )
