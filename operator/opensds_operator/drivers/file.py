"""The embedded default backend: volumes are sparse files in a directory.

Thin volumes are sparse files; thick ones are fully allocated with fallocate. Snapshots and
clones are reflinks where the filesystem offers them (btrfs, xfs) and sparse copies
otherwise. Every object is first written under a temporary name and renamed into place,
so a crash never leaves a half-made volume under its real name; leftovers are removed
when the driver starts (the dock is the only writer of its directory).
"""
from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from ..scheduler import Capabilities
from .base import NotFound, PermanentDriverError, PoolStats, SnapshotInfo, Source, VolumeInfo, local_export

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
TMP_SUFFIX = ".partial"


def _clone_or_copy(src: Path, dst: Path) -> None:
    """Reflink src to dst, or copy only its data extents so holes stay holes."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                raise
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            pos = data
            while pos < hole:
                copied = os.copy_file_range(fin.fileno(), fout.fileno(), hole - pos, pos, pos)
                if copied == 0:
                    break
                pos += copied
            offset = hole
        os.ftruncate(fout.fileno(), size)
        os.fsync(fout.fileno())


class FileDriver:
    """Parameters: `path` (directory), optional `capacity` (bytes; default: the filesystem size)."""

    name = "file"
    native_protocol = "local"

    def __init__(self, path: str, capacity_bytes: int | None = None, pool: str = "default") -> None:
        self.root = Path(path)
        self.pool_name = pool
        self.capacity_bytes = capacity_bytes
        self.volumes = self.root / "volumes"
        self.snapshots = self.root / "snapshots"
        for d in (self.volumes, self.snapshots):
            d.mkdir(parents=True, exist_ok=True)
        self._remove_partials()

    def _remove_partials(self) -> None:
        for d in (self.volumes, self.snapshots):
            for leftover in d.glob(f"*{TMP_SUFFIX}"):
                leftover.unlink(missing_ok=True)

    def _check_pool(self, pool: str) -> None:
        if pool != self.pool_name:
            raise PermanentDriverError(f"file backend has pool {self.pool_name!r}, not {pool!r}")

    def _vol(self, backend_id: str) -> Path:
        return self.volumes / f"{backend_id}.img"

    def _snap(self, backend_id: str) -> Path:
        return self.snapshots / f"{backend_id}.img"

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def pools(self) -> list[PoolStats]:
        st = os.statvfs(self.root)
        fs_total, fs_free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        provisioned = sum(p.stat().st_size for p in self.volumes.glob("*.img"))
        total = self.capacity_bytes or fs_total
        allocated = sum(p.stat().st_blocks * 512 for d in (self.volumes, self.snapshots) for p in d.glob("*.img"))
        free = max(min(total - allocated, fs_free), 0)
        caps = Capabilities(
            storage_types=frozenset({"block"}),
            thin=True,
            thick=True,
            snapshot=True,
            clone=True,
            multi_attach=False,
            protocols=frozenset({"local"}),
            max_volume_bytes=total,
        )
        return [PoolStats(self.pool_name, total, free, provisioned, caps)]

    def get_volume(self, backend_id: str, pool: str) -> VolumeInfo | None:
        self._check_pool(pool)
        path = self._vol(backend_id)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return VolumeInfo(backend_id, st.st_size, st.st_blocks * 512, str(path))

    def create_volume(
        self, backend_id: str, pool: str, size_bytes: int, thin: bool, source: Source | None = None
    ) -> VolumeInfo:
        self._check_pool(pool)
        existing = self.get_volume(backend_id, pool)
        if existing is not None:
            return existing
        final = self._vol(backend_id)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if source is not None:
            origin = self._snap(source.backend_id) if source.kind == "Snapshot" else self._vol(source.backend_id)
            if not origin.exists():
                raise NotFound(f"{source.kind.lower()} {source.backend_id} not found on backend")
            if origin.stat().st_size > size_bytes:
                raise PermanentDriverError(
                    f"requested size {size_bytes} is smaller than the source ({origin.stat().st_size} bytes)"
                )
            _clone_or_copy(origin, tmp)
        else:
            tmp.touch()
        with open(tmp, "r+b") as f:
            if thin:
                os.ftruncate(f.fileno(), max(size_bytes, os.fstat(f.fileno()).st_size))
            else:
                os.posix_fallocate(f.fileno(), 0, size_bytes)
            os.fsync(f.fileno())
        self._publish(tmp, final)
        info = self.get_volume(backend_id, pool)
        assert info is not None
        return info

    def delete_volume(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        self._vol(backend_id).unlink(missing_ok=True)

    def extend_volume(self, backend_id: str, pool: str, size_bytes: int) -> VolumeInfo:
        info = self.get_volume(backend_id, pool)
        if info is None:
            raise NotFound(f"volume {backend_id} not found on backend")
        if size_bytes < info.size_bytes:
            raise PermanentDriverError(f"cannot shrink {backend_id} from {info.size_bytes} to {size_bytes} bytes")
        if size_bytes > info.size_bytes:
            with open(self._vol(backend_id), "r+b") as f:
                thick = info.allocated_bytes >= info.size_bytes
                if thick:
                    os.posix_fallocate(f.fileno(), 0, size_bytes)
                else:
                    os.ftruncate(f.fileno(), size_bytes)
        info = self.get_volume(backend_id, pool)
        assert info is not None
        return info

    def create_snapshot(self, backend_id: str, pool: str, volume_id: str) -> SnapshotInfo:
        self._check_pool(pool)
        final = self._snap(backend_id)
        if not final.exists():
            origin = self._vol(volume_id)
            if not origin.exists():
                raise NotFound(f"volume {volume_id} not found on backend")
            tmp = final.with_name(final.name + TMP_SUFFIX)
            _clone_or_copy(origin, tmp)
            self._publish(tmp, final)
        st = final.stat()
        created = datetime.fromtimestamp(st.st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return SnapshotInfo(backend_id, st.st_size, created)

    def delete_snapshot(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        self._snap(backend_id).unlink(missing_ok=True)

    def export(self, backend_id: str, pool: str, hosts: Sequence[str]) -> dict[str, str]:
        return local_export(self, backend_id, pool)

    def list_objects(self, pool: str) -> list[str]:
        self._check_pool(pool)
        return sorted(p.stem for d in (self.volumes, self.snapshots) for p in d.glob("*.img"))
