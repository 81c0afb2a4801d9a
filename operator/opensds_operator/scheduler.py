"""Pick a pool for a volume: filter every pool, weigh the survivors, explain every refusal.

Pure functions over plain data so every filter is unit-tested without a cluster. The
operator feeds it the pools from StorageBackend.status and the bytes already committed
to each pool by Volumes it has placed (status may lag behind fresh placements).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .api import NODE_LOCAL_PROTOCOLS, NODE_TOPOLOGY_KEY
from .quantity import format_bytes

PoolKey = tuple[str, str]  # (backend, pool)


@dataclass(frozen=True)
class Capabilities:
    storage_types: frozenset[str] = frozenset({"block"})
    thin: bool = True
    thick: bool = False
    snapshot: bool = True
    clone: bool = True
    multi_attach: bool = False
    protocols: frozenset[str] = frozenset({"local"})
    max_volume_bytes: int = 0  # 0: no limit beyond pool capacity
    custom: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_status(cls, caps: Mapping[str, Any]) -> Capabilities:
        return cls(
            storage_types=frozenset(caps.get("storageTypes", ["block"])),
            thin=bool(caps.get("thin", False)),
            thick=bool(caps.get("thick", False)),
            snapshot=bool(caps.get("snapshot", False)),
            clone=bool(caps.get("clone", False)),
            multi_attach=bool(caps.get("multiAttach", False)),
            protocols=frozenset(caps.get("protocols", [])),
            max_volume_bytes=int(caps.get("maxVolumeBytes", 0)),
            custom=dict(caps.get("custom", {})),
        )

    def to_status(self) -> dict[str, Any]:
        return {
            "storageTypes": sorted(self.storage_types),
            "thin": self.thin,
            "thick": self.thick,
            "snapshot": self.snapshot,
            "clone": self.clone,
            "multiAttach": self.multi_attach,
            "protocols": sorted(self.protocols),
            "maxVolumeBytes": self.max_volume_bytes,
            "custom": dict(self.custom),
        }


@dataclass(frozen=True)
class Pool:
    backend: str
    name: str
    ready: bool
    total_bytes: int
    free_bytes: int
    provisioned_bytes: int
    capabilities: Capabilities
    topology: Mapping[str, str] = field(default_factory=dict)
    over_subscription_ratio: float = 1.0
    last_probe: float | None = None  # epoch seconds of the dock's last capacity report
    stale_after: float = 100.0  # a report older than this means the dock is not running
    node: str | None = None  # the node hosting a node-local backend

    def topology_for(self, protocol: str) -> dict[str, str]:
        """Where a volume of this pool is reachable: node-local protocols add the backend's node."""
        if self.node and protocol in NODE_LOCAL_PROTOCOLS:
            return {**self.topology, NODE_TOPOLOGY_KEY: self.node}
        return dict(self.topology)

    @property
    def key(self) -> PoolKey:
        return (self.backend, self.name)

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.name}"


@dataclass(frozen=True)
class Request:
    size_bytes: int
    storage_type: str = "block"
    protocol: str = "local"
    provisioning: str = "thin"
    multi_attach: bool = False
    custom_properties: Mapping[str, str] = field(default_factory=dict)
    requisite_topology: Sequence[Mapping[str, str]] = ()
    preferred_topology: Sequence[Mapping[str, str]] = ()
    allowed_topology: Sequence[Mapping[str, str]] = ()
    pinned_backend: str | None = None
    pinned_pool: str | None = None
    at: float | None = None  # scheduling time (epoch seconds); None skips the staleness check
    source_pool: PoolKey | None = None  # snapshots and clones are made inside their source's pool


Filter = Callable[[Request, Pool, int], str | None]  # (request, pool, committed bytes) -> refusal or None


def _segment_matches(segment: Mapping[str, str], topology: Mapping[str, str]) -> bool:
    """A key the pool does not carry does not confine it: a network pool without a node label
    is reachable from every node, so it matches the per-node segments CSI passes."""
    return all(topology.get(k, v) == v for k, v in segment.items())


def backend_ready(r: Request, p: Pool, _c: int) -> str | None:
    if not p.ready:
        return "backend not Ready"
    if r.at is not None and (p.last_probe is None or r.at - p.last_probe > p.stale_after):
        age = "never" if p.last_probe is None else f"{r.at - p.last_probe:.0f}s ago"
        return f"capacity report is stale (last {age}); is the backend's dock running?"
    return None


def placement(r: Request, p: Pool, _c: int) -> str | None:
    if r.pinned_backend and r.pinned_backend != p.backend:
        return f"volume is pinned to backend {r.pinned_backend}"
    if r.pinned_pool and r.pinned_pool != p.name:
        return f"volume is pinned to pool {r.pinned_pool}"
    return None


def source_locality(r: Request, p: Pool, _c: int) -> str | None:
    if r.source_pool and r.source_pool != p.key:
        return f"source lives in {r.source_pool[0]}/{r.source_pool[1]}"
    return None


def storage_type(r: Request, p: Pool, _c: int) -> str | None:
    if r.storage_type not in p.capabilities.storage_types:
        return f"storage type {r.storage_type} not offered (offers {', '.join(sorted(p.capabilities.storage_types))})"
    return None


def protocol(r: Request, p: Pool, _c: int) -> str | None:
    if r.protocol not in p.capabilities.protocols:
        offered = ", ".join(sorted(p.capabilities.protocols)) or "none"
        return f"protocol {r.protocol} not offered (offers {offered})"
    return None


def provisioning(r: Request, p: Pool, _c: int) -> str | None:
    if r.provisioning == "thin" and not p.capabilities.thin:
        return "thin provisioning not supported"
    if r.provisioning == "thick" and not p.capabilities.thick:
        return "thick provisioning not supported"
    return None


def multi_attach(r: Request, p: Pool, _c: int) -> str | None:
    if r.multi_attach and not p.capabilities.multi_attach:
        return "multi-attach not supported"
    return None


def custom_properties(r: Request, p: Pool, _c: int) -> str | None:
    for key, wanted in sorted(r.custom_properties.items()):
        have = p.capabilities.custom.get(key)
        if have != wanted:
            return f"capability {key}={wanted} required, pool has {key}={have if have is not None else '<unset>'}"
    return None


def topology(r: Request, p: Pool, _c: int) -> str | None:
    for constraint, what in ((r.requisite_topology, "requisite"), (r.allowed_topology, "allowed")):
        reach = p.topology_for(r.protocol)
        if constraint and not any(_segment_matches(seg, reach) for seg in constraint):
            return f"topology {reach} outside the {what} topology"
    return None


def capacity(r: Request, p: Pool, committed: int) -> str | None:
    limit_max = p.capabilities.max_volume_bytes
    if limit_max and r.size_bytes > limit_max:
        return f"size {format_bytes(r.size_bytes)} exceeds the pool's max volume size {format_bytes(limit_max)}"
    ratio = p.over_subscription_ratio if r.provisioning == "thin" else 1.0
    limit = int(p.total_bytes * ratio)
    if committed + r.size_bytes > limit:
        return (
            f"insufficient capacity: {format_bytes(r.size_bytes)} requested, "
            f"{format_bytes(max(limit - committed, 0))} left of {format_bytes(limit)}"
            + (f" (over-subscription ratio {ratio:g})" if ratio != 1.0 else "")
        )
    if r.provisioning == "thick" and r.size_bytes > p.free_bytes:
        return f"insufficient free space for a thick volume: {format_bytes(p.free_bytes)} free"
    return None


def available_bytes(r: Request, p: Pool) -> int:
    """What a new volume of this request could still get from the pool (for CSI GetCapacity)."""
    ratio = p.over_subscription_ratio if r.provisioning == "thin" else 1.0
    left = max(int(p.total_bytes * ratio) - p.provisioned_bytes, 0)
    if r.provisioning == "thick":
        left = min(left, p.free_bytes)
    return left


def largest_volume_bytes(r: Request, p: Pool) -> int:
    """The biggest single volume of this request the pool could make now."""
    left = available_bytes(r, p)
    return min(left, p.capabilities.max_volume_bytes) if p.capabilities.max_volume_bytes else left


DEFAULT_FILTERS: tuple[Filter, ...] = (
    backend_ready, placement, source_locality, storage_type, protocol, provisioning,
    multi_attach, custom_properties, topology, capacity,
)

Weigher = Callable[[Request, Pool, int], float]  # higher is better, in [0, 1]


def free_space_weigher(r: Request, p: Pool, committed: int) -> float:
    ratio = p.over_subscription_ratio if r.provisioning == "thin" else 1.0
    limit = p.total_bytes * ratio
    return 0.0 if limit <= 0 else max(limit - committed - r.size_bytes, 0) / limit


def preferred_topology_weigher(r: Request, p: Pool, _c: int) -> float:
    """1 for the first preferred segment, decreasing for later ones, 0 for none (CSI semantics)."""
    for i, seg in enumerate(r.preferred_topology):
        if _segment_matches(seg, p.topology_for(r.protocol)):
            return 1.0 - i / (len(r.preferred_topology) + 1)
    return 0.0


DEFAULT_WEIGHERS: tuple[tuple[Weigher, float], ...] = (
    (preferred_topology_weigher, 10.0),
    (free_space_weigher, 1.0),
)


@dataclass(frozen=True)
class Decision:
    pool: Pool | None
    rejections: dict[str, str]  # pool label -> why it was refused

    def explain(self) -> str:
        if not self.rejections:
            return "no StorageBackend reports any pool"
        return "; ".join(f"{label}: {why}" for label, why in sorted(self.rejections.items()))


def schedule(
    request: Request,
    pools: Sequence[Pool],
    committed: Mapping[PoolKey, int],
    filters: Sequence[Filter] = DEFAULT_FILTERS,
    weighers: Sequence[tuple[Weigher, float]] = DEFAULT_WEIGHERS,
) -> Decision:
    rejections: dict[str, str] = {}
    fits: list[tuple[float, str, Pool]] = []
    for pool in pools:
        used = max(committed.get(pool.key, 0), pool.provisioned_bytes)
        reason = next((why for f in filters if (why := f(request, pool, used)) is not None), None)
        if reason is not None:
            rejections[pool.label] = reason
            continue
        score = sum(w(request, pool, used) * m for w, m in weighers)
        fits.append((score, pool.label, pool))
    if not fits:
        return Decision(None, rejections)
    fits.sort(key=lambda t: (-t[0], t[1]))
    return Decision(fits[0][2], rejections)


DEFAULT_REPORT_INTERVAL = 30.0


def pools_from_backend(backend: Mapping[str, Any], default_ratio: float = 1.0) -> list[Pool]:
    """Pools of a StorageBackend object as the scheduler sees them."""
    spec, status = backend.get("spec", {}), backend.get("status", {}) or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
    ratio = float(spec.get("maxOverSubscriptionRatio", default_ratio))
    name = backend["metadata"]["name"]
    probe = status.get("lastProbeTime")
    last_probe = datetime.strptime(probe, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp() if probe else None
    stale_after = 3 * float(spec.get("capacityReportIntervalSeconds", DEFAULT_REPORT_INTERVAL)) + 10
    return [
        Pool(
            backend=name,
            name=p["name"],
            ready=ready,
            total_bytes=int(p.get("totalBytes", 0)),
            free_bytes=int(p.get("freeBytes", 0)),
            provisioned_bytes=int(p.get("provisionedBytes", 0)),
            capabilities=Capabilities.from_status(p.get("capabilities", {})),
            topology={**spec.get("topology", {}), **p.get("topology", {})},
            over_subscription_ratio=ratio,
            last_probe=last_probe,
            stale_after=stale_after,
            node=spec.get("nodeName"),
        )
        for p in status.get("pools", [])
    ]


def request_for(volume_spec: Mapping[str, Any], profile_spec: Mapping[str, Any], size_bytes: int,
                source_pool: PoolKey | None = None) -> Request:
    """The scheduling request for a Volume of a given StorageProfile."""
    prov = profile_spec.get("provisioning", {}) or {}
    access = volume_spec.get("accessibilityRequirements", {}) or {}
    return Request(
        size_bytes=size_bytes,
        storage_type=profile_spec.get("storageType", "block"),
        protocol=profile_spec.get("accessProtocol", "local"),
        provisioning=prov.get("type", "thin"),
        multi_attach=bool(prov.get("multiAttach", False)),
        custom_properties=dict(profile_spec.get("customProperties", {}) or {}),
        requisite_topology=list(access.get("requisite", []) or []),
        preferred_topology=list(access.get("preferred", []) or []),
        allowed_topology=list(profile_spec.get("allowedTopologies", []) or []),
        pinned_backend=volume_spec.get("backend"),
        pinned_pool=volume_spec.get("pool"),
        source_pool=source_pool,
    )
