"""LVM thin driver: one thin pool of a volume group is one OpenSDS pool.

Reads state from `lvs`/`vgs --reportformat json` (never from text columns). Thin snapshots
and clones are LVM thin snapshots; activation-skip is turned off on clones so they come up
like any volume. Needs device-mapper (dm-thin-pool): the CI host kernel lacks it, the VM
tier (hack/vm.sh) has it.
"""
from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..scheduler import Capabilities
from .base import (
    DriverError,
    NotFound,
    PermanentDriverError,
    PoolStats,
    SnapshotInfo,
    Source,
    VolumeInfo,
    local_export,
)

LV_FIELDS = "lv_name,lv_size,data_percent,pool_lv,lv_attr,lv_path,lv_time,origin"


def _run(*args: str) -> str:
    try:
        done = subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as e:
        raise PermanentDriverError(f"{args[0]} not installed on this node") from e
    except subprocess.CalledProcessError as e:
        raise DriverError(f"{' '.join(args[:2])} failed: {e.stderr.strip()}") from e
    return done.stdout


def parse_lvs(output: str) -> list[dict[str, Any]]:
    """Rows of `lvs --reportformat json --units b --nosuffix`."""
    doc = json.loads(output)
    rows: list[dict[str, Any]] = [row for report in doc.get("report", []) for row in report.get("lv", [])]
    return rows


def thin_pool_stats(rows: list[dict[str, Any]], pool: str) -> tuple[int, int, int]:
    """(total, free, provisioned) bytes of a thin pool from lvs rows."""
    pool_row = next((r for r in rows if r["lv_name"] == pool), None)
    if pool_row is None:
        raise PermanentDriverError(f"thin pool {pool} not found")
    total = int(pool_row["lv_size"])
    used = int(total * float(pool_row.get("data_percent") or 0) / 100)
    provisioned = sum(int(r["lv_size"]) for r in rows if r.get("pool_lv") == pool and r["lv_name"].startswith("vol-"))
    return total, total - used, provisioned


class LvmDriver:
    name = "lvm"
    native_protocol = "local"

    def __init__(self, volume_group: str, thin_pool: str) -> None:
        self.vg = volume_group
        self.thin_pool = thin_pool

    def _lvs(self) -> list[dict[str, Any]]:
        """Every LV of the volume group, as rows of `lvs --reportformat json`."""
        return parse_lvs(_run("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS, self.vg))

    def _check_pool(self, pool: str) -> None:
        if pool != self.thin_pool:
            raise PermanentDriverError(f"lvm backend has pool {self.thin_pool!r}, not {pool!r}")

    def _lv(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self._lvs() if r["lv_name"] == name), None)

    def pools(self) -> list[PoolStats]:
        total, free, provisioned = thin_pool_stats(self._lvs(), self.thin_pool)
        caps = Capabilities(
            storage_types=frozenset({"block"}), thin=True, thick=False, snapshot=True, clone=True,
            protocols=frozenset({"local"}), max_volume_bytes=0,  # network protocols: the dock's exporters
        )
        return [PoolStats(self.thin_pool, total, free, provisioned, caps)]

    def _info(self, row: dict[str, Any]) -> VolumeInfo:
        size = int(row["lv_size"])
        used = int(size * float(row.get("data_percent") or 0) / 100)
        return VolumeInfo(row["lv_name"], size, used, row.get("lv_path", f"/dev/{self.vg}/{row['lv_name']}"))

    def get_volume(self, backend_id: str, pool: str) -> VolumeInfo | None:
        self._check_pool(pool)
        row = self._lv(backend_id)
        return self._info(row) if row else None

    def create_volume(self, backend_id: str, pool: str, size_bytes: int, thin: bool,
                      source: Source | None = None) -> VolumeInfo:
        self._check_pool(pool)
        if not thin:
            raise PermanentDriverError("lvm thin pools provide thin volumes only")
        existing = self.get_volume(backend_id, pool)
        if existing is None:
            if source is None:
                _run("lvcreate", "-y", "-V", f"{size_bytes}b", "-T", f"{self.vg}/{self.thin_pool}",
                     "-n", backend_id)
            else:
                if self._lv(source.backend_id) is None:
                    raise NotFound(f"{source.kind.lower()} {source.backend_id} not found on backend")
                _run("lvcreate", "-y", "-s", "--setactivationskip", "n", "-n", backend_id,
                     f"{self.vg}/{source.backend_id}")
                _run("lvchange", "-ay", f"{self.vg}/{backend_id}")
            existing = self.get_volume(backend_id, pool)
            assert existing is not None
        if existing.size_bytes < size_bytes:
            return self.extend_volume(backend_id, pool, size_bytes)
        return existing

    def delete_volume(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        if self._lv(backend_id) is not None:
            _run("lvremove", "-y", f"{self.vg}/{backend_id}")

    def extend_volume(self, backend_id: str, pool: str, size_bytes: int) -> VolumeInfo:
        info = self.get_volume(backend_id, pool)
        if info is None:
            raise NotFound(f"volume {backend_id} not found on backend")
        if size_bytes < info.size_bytes:
            raise PermanentDriverError(f"cannot shrink {backend_id}")
        if size_bytes > info.size_bytes:
            _run("lvextend", "-L", f"{size_bytes}b", f"{self.vg}/{backend_id}")
        info = self.get_volume(backend_id, pool)
        assert info is not None
        return info

    def create_snapshot(self, backend_id: str, pool: str, volume_id: str) -> SnapshotInfo:
        self._check_pool(pool)
        row = self._lv(backend_id)
        if row is None:
            if self._lv(volume_id) is None:
                raise NotFound(f"volume {volume_id} not found on backend")
            _run("lvcreate", "-y", "-s", "-n", backend_id, f"{self.vg}/{volume_id}")
            row = self._lv(backend_id)
            assert row is not None
        created = row.get("lv_time") or datetime.now(UTC).isoformat()
        try:
            stamp = datetime.strptime(created, "%Y-%m-%d %H:%M:%S %z").astimezone(UTC)
            created = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return SnapshotInfo(backend_id, int(row["lv_size"]), created)

    def delete_snapshot(self, backend_id: str, pool: str) -> None:
        self.delete_volume(backend_id, pool)

    def export(self, backend_id: str, pool: str, hosts: Sequence[str]) -> dict[str, str]:
        return local_export(self, backend_id, pool)

    def list_objects(self, pool: str) -> list[str]:
        self._check_pool(pool)
        return sorted(r["lv_name"] for r in self._lvs() if r.get("pool_lv") == pool)
