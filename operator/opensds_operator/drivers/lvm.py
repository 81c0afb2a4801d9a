"""LVM thin driver: one thin pool of a volume group is one OpenSDS pool.

Reads state from `lvs`/`vgs --reportformat json` (never from text columns). Thin snapshots
and clones are LVM thin snapshots; activation-skip is turned off on clones so they come up
like any volume. Needs device-mapper (dm-thin-pool): the CI host kernel lacks it, the VM
tier (hack/vm.sh) has it.

Owner tags are LV tags given to `lvcreate --addtag`, so an LV never exists untagged: one tag
per field, `opensds.<field>=<value>` (values outside LVM's tag characters hex-encoded as
`x:<hex>`). The sweep's quarantine tags the LV with `opensds.quarantined=<epoch>` and renames
it to `quarantine-<name>`; purge removes it. Names always follow `--` on the command line.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..hosttools import is_missing_executable, missing_tool_message
from ..scheduler import Capabilities
from .base import (
    BackendObject,
    DriverError,
    NotFound,
    Owner,
    PermanentDriverError,
    PoolStats,
    SnapshotInfo,
    Source,
    VolumeInfo,
    local_export,
)

LV_FIELDS = "lv_name,lv_size,data_percent,pool_lv,lv_attr,lv_path,lv_time,origin,lv_tags"
TAG_PREFIX = "opensds."
QUARANTINE_PREFIX = "quarantine-"
QUARANTINED_TAG = TAG_PREFIX + "quarantined"
OWNER_FIELDS = ("cluster", "backend", "kind", "namespace", "name", "uid", "retained")
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_+.-]*")  # a subset of LVM's tag characters [A-Za-z0-9_+.-/=!:&#]
_LV_NAME = re.compile(r"[A-Za-z0-9_.+][A-Za-z0-9_.+-]*")
MAX_LV_NAME = 127
MAX_TAG = 1024


def _run(*args: str) -> str:
    try:
        done = subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as e:
        if is_missing_executable(e, args):
            raise PermanentDriverError(missing_tool_message(args[0])) from e
        raise
    except subprocess.TimeoutExpired as e:
        raise DriverError(f"{args[0]} did not finish in {e.timeout:.0f} s") from e
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


def _encode(value: str) -> str:
    return value if _SAFE_VALUE.fullmatch(value) else "x:" + value.encode().hex()


def _decode(value: str) -> str | None:
    if not value.startswith("x:"):
        return value
    try:
        return bytes.fromhex(value[2:]).decode()
    except ValueError:
        return None


def owner_tags(owner: Owner) -> list[str]:
    """The LV tags that record an owner: `opensds.<field>=<value>` (Kubernetes names fit LVM's 1024 characters)."""
    tags = [f"{TAG_PREFIX}{key}={_encode(value)}" for key, value in owner.to_dict().items()]
    if any(len(t) > MAX_TAG for t in tags):
        raise PermanentDriverError(f"the owner {owner.namespace}/{owner.name} does not fit LVM tags of {MAX_TAG} "
                                   f"characters")
    return tags


def parse_tags(lv_tags: str) -> dict[str, list[str]]:
    """The opensds.* tags of an `lv_tags` report column (comma separated), by field."""
    fields: dict[str, list[str]] = {}
    for tag in filter(None, (t.strip() for t in lv_tags.split(","))):
        key, sep, value = tag.partition("=")
        if sep and key.startswith(TAG_PREFIX):
            fields.setdefault(key.removeprefix(TAG_PREFIX), []).append(value)
    return fields


def owner_from_tags(backend_id: str, lv_tags: str) -> Owner | None:
    """The owner the tags record, or None: no tags, incomplete, contradictory (two values for one
    field), or naming another object's UID than this LV's own name (tags a snapshot inherited)."""
    data: dict[str, str] = {}
    for key, values in parse_tags(lv_tags).items():
        if key not in OWNER_FIELDS:
            continue
        decoded = {_decode(v) for v in values}
        if len(decoded) != 1 or None in decoded:
            return None
        value = decoded.pop()
        assert value is not None
        data[key] = value
    owner = Owner.from_dict(data)
    if owner is None or not owner.uid or not backend_id.endswith(owner.uid):
        return None
    return owner


def quarantined_at(lv_tags: str) -> float | None:
    values = parse_tags(lv_tags).get("quarantined", [])
    try:
        return max(float(v) for v in values) if values else None
    except ValueError:
        return None


def _check_name(name: str) -> str:
    if not _LV_NAME.fullmatch(name) or len(QUARANTINE_PREFIX + name) > MAX_LV_NAME:
        raise PermanentDriverError(f"{name!r} is not a usable LV name (letters, digits, '+_.-', not starting "
                                   f"with '-', at most {MAX_LV_NAME - len(QUARANTINE_PREFIX)} characters)")
    return name


class LvmDriver:
    name = "lvm"
    native_protocol = "local"

    def __init__(self, volume_group: str, thin_pool: str) -> None:
        self.vg = _check_name(volume_group)
        self.thin_pool = _check_name(thin_pool)

    def _lvs(self) -> list[dict[str, Any]]:
        """Every LV of the volume group, as rows of `lvs --reportformat json`."""
        return parse_lvs(_run("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS,
                              "--", self.vg))

    def _check_pool(self, pool: str) -> None:
        if pool != self.thin_pool:
            raise PermanentDriverError(f"lvm backend has pool {self.thin_pool!r}, not {pool!r}")

    def _lv(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self._lvs() if r["lv_name"] == name), None)

    def _path(self, name: str) -> str:
        return f"{self.vg}/{_check_name(name)}"

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
        row = self._lv(_check_name(backend_id))
        return self._info(row) if row else None

    @staticmethod
    def _addtags(owner: Owner | None) -> list[str]:
        return [arg for tag in (owner_tags(owner) if owner else []) for arg in ("--addtag", tag)]

    def _retag(self, name: str, lv_tags: str, owner: Owner) -> None:
        """Make the owner tags exactly `owner`'s in one metadata update (other tags stay)."""
        wanted = set(owner_tags(owner))
        current = {t.strip() for t in lv_tags.split(",") if t.strip()}
        stale = {t for t in current if t.startswith(TAG_PREFIX) and t.partition("=")[0].removeprefix(TAG_PREFIX)
                 in OWNER_FIELDS and t not in wanted}
        args = [a for t in sorted(stale) for a in ("--deltag", t)]
        args += [a for t in sorted(wanted - current) for a in ("--addtag", t)]
        if args:
            _run("lvchange", *args, "--", self._path(name))

    def _adopt(self, row: dict[str, Any], owner: Owner | None) -> None:
        """A retry, an object of an older release, or a snapshot with inherited tags gets its own owner tag."""
        if owner is not None and owner_from_tags(row["lv_name"], row.get("lv_tags", "")) is None:
            self._retag(row["lv_name"], row.get("lv_tags", ""), owner)

    def _refuse_if_quarantined(self, backend_id: str) -> None:
        if self._lv(QUARANTINE_PREFIX + backend_id) is not None:
            raise PermanentDriverError(
                f"{backend_id} is in quarantine as {self.vg}/{QUARANTINE_PREFIX}{backend_id}: rename it back to "
                f"restore it, or let the sweep purge it, before it is created again")

    def create_volume(self, backend_id: str, pool: str, size_bytes: int, thin: bool,
                      source: Source | None = None, owner: Owner | None = None) -> VolumeInfo:
        self._check_pool(pool)
        if not thin:
            raise PermanentDriverError("lvm thin pools provide thin volumes only")
        _check_name(backend_id)
        row = self._lv(backend_id)
        if row is None:
            self._refuse_if_quarantined(backend_id)
            if source is None:
                _run("lvcreate", "-y", "-V", f"{size_bytes}b", "-T", f"{self.vg}/{self.thin_pool}",
                     "-n", backend_id, *self._addtags(owner))
            else:
                if self._lv(_check_name(source.backend_id)) is None:
                    raise NotFound(f"{source.kind.lower()} {source.backend_id} not found on backend")
                _run("lvcreate", "-y", "-s", "--setactivationskip", "n", "-n", backend_id, *self._addtags(owner),
                     "--", self._path(source.backend_id))
                _run("lvchange", "-ay", "--", self._path(backend_id))
            row = self._lv(backend_id)
            assert row is not None
        self._adopt(row, owner)
        existing = self._info(row)
        if existing.size_bytes < size_bytes:
            return self.extend_volume(backend_id, pool, size_bytes)
        return existing

    def delete_volume(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        if self._lv(_check_name(backend_id)) is not None:
            _run("lvremove", "-y", "--", self._path(backend_id))

    def extend_volume(self, backend_id: str, pool: str, size_bytes: int) -> VolumeInfo:
        info = self.get_volume(backend_id, pool)
        if info is None:
            raise NotFound(f"volume {backend_id} not found on backend")
        if size_bytes < info.size_bytes:
            raise PermanentDriverError(f"cannot shrink {backend_id}")
        if size_bytes > info.size_bytes:
            _run("lvextend", "-L", f"{size_bytes}b", "--", self._path(backend_id))
        info = self.get_volume(backend_id, pool)
        assert info is not None
        return info

    def create_snapshot(self, backend_id: str, pool: str, volume_id: str,
                        owner: Owner | None = None) -> SnapshotInfo:
        self._check_pool(pool)
        row = self._lv(_check_name(backend_id))
        if row is None:
            self._refuse_if_quarantined(backend_id)
            if self._lv(_check_name(volume_id)) is None:
                raise NotFound(f"volume {volume_id} not found on backend")
            _run("lvcreate", "-y", "-s", "-n", backend_id, *self._addtags(owner), "--", self._path(volume_id))
            row = self._lv(backend_id)
            assert row is not None
        self._adopt(row, owner)
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

    # ------------------------------------------------------------ sweep

    def list_objects(self, pool: str) -> list[str]:
        self._check_pool(pool)
        return sorted(r["lv_name"] for r in self._lvs()
                      if r.get("pool_lv") == pool and not r["lv_name"].startswith(QUARANTINE_PREFIX))

    def scan(self, pool: str) -> list[BackendObject]:
        self._check_pool(pool)
        found = []
        for row in self._lvs():
            name, tags = row["lv_name"], row.get("lv_tags", "")
            if row.get("pool_lv") != pool:
                continue
            backend_id = name.removeprefix(QUARANTINE_PREFIX)
            if not backend_id.startswith(("vol-", "snap-")):
                continue
            when = None
            if name.startswith(QUARANTINE_PREFIX):
                # the time tag precedes the rename; without one (a hand-made name) the object counts as
                # quarantined just now, so it is never purged early
                when = quarantined_at(tags) or time.time()
            found.append(BackendObject(backend_id, owner_from_tags(backend_id, tags), when))
        return sorted(found, key=lambda o: (o.backend_id, o.quarantined_at is not None))

    def set_owner(self, backend_id: str, pool: str, owner: Owner) -> None:
        self._check_pool(pool)
        for name in (_check_name(backend_id), QUARANTINE_PREFIX + backend_id):
            row = self._lv(name)
            if row is not None:
                self._retag(name, row.get("lv_tags", ""), owner)
                return
        raise NotFound(f"{backend_id} not found on backend")

    def quarantine(self, backend_id: str, pool: str) -> None:
        """Time tag first, then the rename to quarantine-<name> (a retry completes it)."""
        self._check_pool(pool)
        rows = {r["lv_name"]: r for r in self._lvs()}
        live, quarantined = rows.get(_check_name(backend_id)), rows.get(QUARANTINE_PREFIX + backend_id)
        if live is not None:
            if quarantined is not None:
                raise PermanentDriverError(f"{backend_id} exists both live and in quarantine; resolve by hand")
            stale = [a for v in parse_tags(live.get("lv_tags", "")).get("quarantined", [])
                     for a in ("--deltag", f"{QUARANTINED_TAG}={v}")]
            _run("lvchange", *stale, "--addtag", f"{QUARANTINED_TAG}={int(time.time())}", "--",
                 self._path(backend_id))
            _run("lvrename", "--", self._path(backend_id), self._path(QUARANTINE_PREFIX + backend_id))
        elif quarantined is not None and quarantined_at(quarantined.get("lv_tags", "")) is None:
            _run("lvchange", "--addtag", f"{QUARANTINED_TAG}={int(time.time())}", "--",
                 self._path(QUARANTINE_PREFIX + backend_id))

    def purge(self, backend_id: str, pool: str) -> None:
        """Remove the quarantined LV; a live LV of the same id is never touched."""
        self._check_pool(pool)
        name = QUARANTINE_PREFIX + _check_name(backend_id)
        if self._lv(name) is not None:
            _run("lvremove", "-y", "--", self._path(name))
