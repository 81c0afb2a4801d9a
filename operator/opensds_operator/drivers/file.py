"""The embedded default backend: volumes are sparse files in a directory.

Thin volumes are sparse files; thick ones are fully allocated with fallocate. Snapshots and
clones are reflinks where the filesystem offers them (btrfs, xfs) and sparse copies
otherwise. Every object is first written under a temporary name, tagged with its owner and
renamed into place, so a crash never leaves a half-made or untagged volume under its real
name. The owner tag is a `user.opensds.owner` xattr (JSON), or a `<name>.owner.json` sidecar
written and fsynced before the rename where the filesystem has no user xattrs.

The sweep's quarantine moves an object into `quarantine/` (same filesystem, so a rename) with a
`<name>.quarantined` marker holding the time; nothing else looks there. Images are 0600 in
0700 directories: only root (the dock, the node plugin) opens them.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from ..scheduler import Capabilities
from .base import (
    BackendObject,
    NotFound,
    Owner,
    PermanentDriverError,
    PoolStats,
    SnapshotInfo,
    Source,
    VolumeInfo,
    local_export,
)

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
TMP_SUFFIX = ".partial"
IMG_SUFFIX = ".img"
OWNER_XATTR = "user.opensds.owner"
OWNER_SIDECAR = ".owner.json"
QUARANTINE_MARKER = ".quarantined"
QUARANTINE_DIR = "quarantine"
# A leftover of an interrupted create is removed at start only once nothing has written it
# for this long: a second dock on the same directory (a rolling update) may still be writing.
PARTIAL_STALE_SECONDS = 600.0
IMAGE_MODE = 0o600
DIR_MODE = 0o700
NO_XATTR = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_private(path: Path) -> int:
    """Open (truncating) a file only root can read, whatever a crashed attempt left there."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, IMAGE_MODE)
    os.fchmod(fd, IMAGE_MODE)
    return fd


def _write_durably(path: Path, data: bytes) -> None:
    """Write a small file under a temporary name, fsync it and rename it into place."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = _create_private(tmp)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _clone_or_copy(src: Path, fout: int) -> None:
    """Reflink src into the open file fout, or copy only its data extents so holes stay holes."""
    with open(src, "rb") as fin:
        try:
            fcntl.ioctl(fout, FICLONE, fin.fileno())
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
                copied = os.copy_file_range(fin.fileno(), fout, hole - pos, pos, pos)
                if copied == 0:
                    break
                pos += copied
            offset = hole
        os.ftruncate(fout, size)


def _encode_owner(owner: Owner) -> bytes:
    return owner.to_json().encode()


def _decode_owner(backend_id: str, raw: bytes) -> Owner | None:
    return Owner.from_json(backend_id, raw)


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
        self.quarantine_root = self.root / QUARANTINE_DIR
        self._kinds = {self.volumes: self.quarantine_root / "volumes",
                       self.snapshots: self.quarantine_root / "snapshots"}
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        for d in (self.volumes, self.snapshots, self.quarantine_root, *self._kinds.values()):
            d.mkdir(mode=DIR_MODE, exist_ok=True)
            os.chmod(d, DIR_MODE)  # directories made by an older release were 0755
        for live in self._kinds:
            for image in live.glob(f"*{IMG_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    if image.stat().st_mode & 0o777 != IMAGE_MODE:  # made 0644 by an older release
                        os.chmod(image, IMAGE_MODE)
        self._remove_partials()

    def _remove_partials(self, now: float | None = None) -> None:
        """Drop what an interrupted create left behind, once it is provably abandoned.

        A partial is ours (it has our temporary suffix in our directory) and abandoned when
        nothing has written it for PARTIAL_STALE_SECONDS: a create in progress in another
        process (a second dock during a rolling update) keeps its mtime fresh. An owner sidecar
        whose image never got its final name goes with it.
        """
        now = time.time() if now is None else now
        for d in (*self._kinds, *self._kinds.values()):
            for leftover in d.glob(f"*{TMP_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    if now - leftover.stat().st_mtime < PARTIAL_STALE_SECONDS:
                        continue
                    leftover.unlink()
                    name = leftover.name.removesuffix(TMP_SUFFIX)
                    if name.endswith(IMG_SUFFIX):
                        sidecar = d / (name.removesuffix(IMG_SUFFIX) + OWNER_SIDECAR)
                        if not (d / name).exists():
                            sidecar.unlink(missing_ok=True)

    def _check_pool(self, pool: str) -> None:
        if pool != self.pool_name:
            raise PermanentDriverError(f"file backend has pool {self.pool_name!r}, not {pool!r}")

    @staticmethod
    def _check_id(backend_id: str) -> None:
        if not backend_id or "/" in backend_id or backend_id.startswith(".") or "\0" in backend_id:
            raise PermanentDriverError(f"invalid backend id {backend_id!r}")

    def _vol(self, backend_id: str) -> Path:
        self._check_id(backend_id)
        return self.volumes / f"{backend_id}{IMG_SUFFIX}"

    def _snap(self, backend_id: str) -> Path:
        self._check_id(backend_id)
        return self.snapshots / f"{backend_id}{IMG_SUFFIX}"

    def _quarantined(self, live: Path) -> Path:
        return self._kinds[live.parent] / live.name

    @staticmethod
    def _sidecar(image: Path) -> Path:
        return image.with_name(image.name.removesuffix(IMG_SUFFIX) + OWNER_SIDECAR)

    @staticmethod
    def _marker(image: Path) -> Path:
        return image.with_name(image.name.removesuffix(IMG_SUFFIX) + QUARANTINE_MARKER)

    def _find(self, backend_id: str) -> tuple[Path, Path]:
        """(live path, quarantined path) of an object, in the directory of its kind."""
        vol = self._vol(backend_id)
        snap = self._snap(backend_id)
        for live in (vol, snap):
            if live.exists() or self._quarantined(live).exists():
                return live, self._quarantined(live)
        live = snap if backend_id.startswith("snap-") else vol
        return live, self._quarantined(live)

    # ------------------------------------------------------------ owner tags

    def _tag(self, image: Path, fd: int | None, owner: Owner) -> None:
        """Tag an image (by its open fd when it has one): xattr, or a durable sidecar."""
        raw = _encode_owner(owner)
        try:
            if fd is not None:
                os.setxattr(fd, OWNER_XATTR, raw)
            else:
                os.setxattr(image, OWNER_XATTR, raw)
        except OSError as e:
            if e.errno not in NO_XATTR:
                raise
            _write_durably(self._sidecar(image), raw)
        else:
            self._sidecar(image).unlink(missing_ok=True)  # the xattr is the record now

    def _owner(self, image: Path) -> Owner | None:
        backend_id = image.name.removesuffix(IMG_SUFFIX)
        try:
            return _decode_owner(backend_id, os.getxattr(image, OWNER_XATTR))
        except OSError as e:
            if e.errno not in (errno.ENODATA, *NO_XATTR):
                raise
        sidecars = [self._sidecar(image)]
        if image.parent in self._kinds.values():  # a quarantine interrupted between its two renames
            live_dir = next(live for live, q in self._kinds.items() if q == image.parent)
            sidecars.append(self._sidecar(live_dir / image.name))
        for sidecar in sidecars:
            try:
                return _decode_owner(backend_id, sidecar.read_bytes())
            except FileNotFoundError:
                continue
        return None

    # ------------------------------------------------------------ capacity

    def pools(self) -> list[PoolStats]:
        st = os.statvfs(self.root)
        fs_total, fs_free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        provisioned = sum(p.stat().st_size for p in self.volumes.glob(f"*{IMG_SUFFIX}"))
        total = self.capacity_bytes or fs_total
        # quarantined objects still hold their blocks until they are purged
        allocated = sum(p.stat().st_blocks * 512 for d in (*self._kinds, *self._kinds.values())
                        for p in d.glob(f"*{IMG_SUFFIX}"))
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

    # ------------------------------------------------------------ volumes

    def get_volume(self, backend_id: str, pool: str) -> VolumeInfo | None:
        self._check_pool(pool)
        path = self._vol(backend_id)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return VolumeInfo(backend_id, st.st_size, st.st_blocks * 512, str(path))

    def _refuse_if_quarantined(self, live: Path, backend_id: str) -> None:
        """Never make a new empty object beside a quarantined one of the same id."""
        if self._quarantined(live).exists():
            raise PermanentDriverError(
                f"{backend_id} is in quarantine ({self._quarantined(live)}): move it back into "
                f"{live.parent} to restore it, or let the sweep purge it, before it is created again")

    def _adopt(self, image: Path, owner: Owner | None) -> None:
        """A retry (or an object made by an older release) gets the owner tag it lacks."""
        if owner is not None and self._owner(image) is None:
            self._tag(image, None, owner)

    def create_volume(
        self, backend_id: str, pool: str, size_bytes: int, thin: bool, source: Source | None = None,
        owner: Owner | None = None,
    ) -> VolumeInfo:
        self._check_pool(pool)
        existing = self.get_volume(backend_id, pool)
        final = self._vol(backend_id)
        if existing is not None:
            self._adopt(final, owner)
            return existing
        self._refuse_if_quarantined(final, backend_id)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        origin: Path | None = None
        if source is not None:
            origin = self._snap(source.backend_id) if source.kind == "Snapshot" else self._vol(source.backend_id)
            if not origin.exists():
                raise NotFound(f"{source.kind.lower()} {source.backend_id} not found on backend")
            if origin.stat().st_size > size_bytes:
                raise PermanentDriverError(
                    f"requested size {size_bytes} is smaller than the source ({origin.stat().st_size} bytes)"
                )
        fd = _create_private(tmp)
        try:
            if owner is not None:
                self._tag(final, fd, owner)  # on the temporary file (or its sidecar) before the rename
            if origin is not None:
                _clone_or_copy(origin, fd)
            if thin:
                os.ftruncate(fd, max(size_bytes, os.fstat(fd).st_size))
            else:
                os.posix_fallocate(fd, 0, size_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._publish(tmp, final)
        info = self.get_volume(backend_id, pool)
        assert info is not None
        return info

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    @staticmethod
    def _remove(image: Path) -> None:
        image.unlink(missing_ok=True)
        FileDriver._sidecar(image).unlink(missing_ok=True)  # after the image: never an untagged image

    def delete_volume(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        self._remove(self._vol(backend_id))

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

    # ------------------------------------------------------------ snapshots

    def create_snapshot(self, backend_id: str, pool: str, volume_id: str,
                        owner: Owner | None = None) -> SnapshotInfo:
        self._check_pool(pool)
        final = self._snap(backend_id)
        if final.exists():
            self._adopt(final, owner)
        else:
            self._refuse_if_quarantined(final, backend_id)
            origin = self._vol(volume_id)
            if not origin.exists():
                raise NotFound(f"volume {volume_id} not found on backend")
            tmp = final.with_name(final.name + TMP_SUFFIX)
            fd = _create_private(tmp)
            try:
                if owner is not None:
                    self._tag(final, fd, owner)
                _clone_or_copy(origin, fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(tmp, final)
        st = final.stat()
        created = datetime.fromtimestamp(st.st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return SnapshotInfo(backend_id, st.st_size, created)

    def delete_snapshot(self, backend_id: str, pool: str) -> None:
        self._check_pool(pool)
        self._remove(self._snap(backend_id))

    def export(self, backend_id: str, pool: str, hosts: Sequence[str]) -> dict[str, str]:
        return local_export(self, backend_id, pool)

    # ------------------------------------------------------------ sweep

    def list_objects(self, pool: str) -> list[str]:
        self._check_pool(pool)
        return sorted(p.name.removesuffix(IMG_SUFFIX) for d in self._kinds for p in d.glob(f"*{IMG_SUFFIX}"))

    def _images(self) -> Iterator[tuple[Path, bool]]:
        for live, quarantined in self._kinds.items():
            for d, in_quarantine in ((live, False), (quarantined, True)):
                for image in d.glob(f"*{IMG_SUFFIX}"):
                    if image.name.startswith(("vol-", "snap-")):
                        yield image, in_quarantine

    def _quarantined_at(self, image: Path) -> float:
        try:
            return float(self._marker(image).read_text().strip())
        except (FileNotFoundError, ValueError):
            return image.stat().st_ctime  # a rename sets ctime: close to when it was quarantined

    def scan(self, pool: str) -> list[BackendObject]:
        self._check_pool(pool)
        found = []
        for image, in_quarantine in self._images():
            with contextlib.suppress(FileNotFoundError):  # deleted while we looked
                found.append(BackendObject(image.name.removesuffix(IMG_SUFFIX), self._owner(image),
                                           self._quarantined_at(image) if in_quarantine else None))
        return sorted(found, key=lambda o: (o.backend_id, o.quarantined_at is not None))

    def set_owner(self, backend_id: str, pool: str, owner: Owner) -> None:
        self._check_pool(pool)
        live, quarantined = self._find(backend_id)
        for image in (live, quarantined):
            if image.exists():
                self._tag(image, None, owner)
                return
        raise NotFound(f"{backend_id} not found on backend")

    def quarantine(self, backend_id: str, pool: str) -> None:
        """Rename the object into quarantine/ (recoverable by renaming it back), noting when.

        The marker is written first, so a quarantined image always has its time; a crash
        before the rename leaves only a marker, which the retry rewrites.
        """
        self._check_pool(pool)
        live, quarantined = self._find(backend_id)
        marker = self._marker(quarantined)
        if live.exists():
            if quarantined.exists():
                raise PermanentDriverError(
                    f"{backend_id} exists both live and in quarantine ({quarantined}); resolve by hand")
            _write_durably(marker, f"{time.time():.3f}\n".encode())
            os.rename(live, quarantined)
        elif not quarantined.exists():
            return  # nothing to quarantine (already purged, or never made)
        elif not marker.exists():
            _write_durably(marker, f"{time.time():.3f}\n".encode())
        sidecar = self._sidecar(live)
        if sidecar.exists():
            os.rename(sidecar, self._sidecar(quarantined))
        _fsync_dir(quarantined.parent)
        _fsync_dir(live.parent)

    def purge(self, backend_id: str, pool: str) -> None:
        """Delete the quarantined copy for good; a live object of the same id is left alone."""
        self._check_pool(pool)
        _live, quarantined = self._find(backend_id)
        self._remove(quarantined)
        self._marker(quarantined).unlink(missing_ok=True)
