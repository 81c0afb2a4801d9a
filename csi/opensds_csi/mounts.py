"""Filesystems and mounts on the node: what is mounted where (from mountinfo), mkfs, mount, grow."""
from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import FailedPrecondition, InvalidArgument
from .run import CommandFailed, run

SUPPORTED_FILESYSTEMS = ("ext4", "xfs")
SLOW_TIMEOUT = 600.0  # mkfs / grow of a large device: still bounded, never forever
STATS_TIMEOUT = 5.0   # a statvfs that takes longer is a dead mount
_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    target: str
    source: str
    fstype: str
    options: frozenset[str]


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> dict[str, Mount]:
    """Mount point -> its (last, i.e. visible) mount, from /proc/self/mountinfo."""
    found: dict[str, Mount] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 2:
            continue
        target = _unescape(fields[4])
        found[target] = Mount(target, _unescape(tail[1]), tail[0], frozenset(fields[5].split(",")))
    return found


def mount_at(path: str) -> Mount | None:
    return mounts().get(os.path.realpath(path))


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


BLANK_CHECK_BYTES = 1 << 20  # both ends of a device must read back as zeros before it is formatted


@dataclass(frozen=True)
class Probe:
    """What `blkid -p -o export` and a read of the device's first and last MiB found."""

    returncode: int
    values: dict[str, str]
    stderr: str = ""
    zeroed: bool = False


def _export_values(text: str) -> dict[str, str]:
    """blkid's `-o export` format: one KEY=value per line, meant for machines."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def ends_are_zero(device: str) -> bool:
    """Whether the first and last MiB of a block device read back as zeros.

    Any failure to open or read it (missing path, EIO, EBUSY, not a block device) is a
    FailedPrecondition: a device that cannot be read is never taken for a blank one.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise FailedPrecondition(f"cannot open {device} to check it is blank: {e.strerror} (errno {e.errno}); "
                                 f"not formatting it") from e
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            raise FailedPrecondition(f"{device} is not a block device; not formatting it")
        size = os.lseek(fd, 0, os.SEEK_END)
        length = min(size, BLANK_CHECK_BYTES)
        for offset in sorted({0, size - length}):
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise FailedPrecondition(f"short read of {device} at {offset}; not formatting it")
            if data.count(0) != length:
                return False
        return True
    except OSError as e:
        raise FailedPrecondition(f"cannot read {device} to check it is blank: {e.strerror} (errno {e.errno}); "
                                 f"not formatting it") from e
    finally:
        os.close(fd)


def probe(device: str) -> Probe:
    zeroed = ends_are_zero(device)  # first: a missing or unreadable device fails here, never looks blank
    result = run("blkid", "-p", "-o", "export", device, ok_codes=tuple(range(256)))
    return Probe(result.returncode, _export_values(result.stdout), result.stderr.strip(), zeroed)


def filesystem_to_mount(device: str, found: Probe) -> str | None:
    """The filesystem to mount as it is, or None for a device that may be formatted.

    Only a device on which blkid finds nothing at all (exit 2, no error) AND whose both ends
    read back as zeros is blank; a partition table, an unknown or foreign signature (LVM PV,
    LUKS, RAID member, swap), an ambiguous or failed probe and unexplained data are all
    FailedPrecondition naming what was found (as Kubernetes' mount-utils refuses too).
    """
    values = found.values
    if found.returncode == 0:
        fstype = values.get("TYPE", "")
        if fstype and values.get("USAGE", "filesystem") == "filesystem":
            return fstype
        if fstype:
            raise FailedPrecondition(f"{device} holds a {fstype} signature (usage {values.get('USAGE', '?')}), "
                                     f"not a filesystem; refusing to format it")
        if values.get("PTTYPE"):
            raise FailedPrecondition(f"{device} holds a partition table (PTTYPE={values['PTTYPE']}); refusing to "
                                     f"format it")
        named = ", ".join(f"{k}={v}" for k, v in sorted(values.items()) if k != "DEVNAME") or "an unnamed signature"
        raise FailedPrecondition(f"blkid found {named} on {device}; refusing to format it")
    if found.returncode == 2 and not found.stderr:
        if not found.zeroed:
            raise FailedPrecondition(f"{device} has no signature blkid knows, but its first or last MiB holds "
                                     f"data; refusing to format it")
        return None
    if found.returncode == 8:
        raise FailedPrecondition(f"blkid found several conflicting signatures on {device} (ambiguous probe); "
                                 f"refusing to format it")
    raise FailedPrecondition(f"probing {device} failed (blkid exit {found.returncode}: "
                             f"{found.stderr or 'no message'}); refusing to format it")


def detect_filesystem(device: str) -> str | None:
    """The filesystem on a device, None only when it is provably blank (see filesystem_to_mount)."""
    return filesystem_to_mount(device, probe(device))


def make_filesystem(device: str, fstype: str) -> None:
    if fstype == "ext4":
        run("mkfs.ext4", "-F", "-q", "-E", "nodiscard,lazy_itable_init=1", device, timeout=SLOW_TIMEOUT)
    elif fstype == "xfs":
        run("mkfs.xfs", "-q", "-K", device, timeout=SLOW_TIMEOUT)
    else:
        raise InvalidArgument(f"fs_type {fstype!r} is not supported ({', '.join(SUPPORTED_FILESYSTEMS)})")


def filesystem_options(fstype: str, options: list[str]) -> list[str]:
    """The options a filesystem is mounted with: the volume's, plus what cloning needs.

    A volume restored from a snapshot (or cloned) carries its source's XFS UUID, and XFS refuses
    to mount a second filesystem with a UUID already mounted on the node: `nouuid` lets a clone
    and its source be mounted side by side (as ceph-csi does). ext4 does not care.
    """
    if fstype == "xfs" and "nouuid" not in options:
        return [*options, "nouuid"]
    return list(options)


def mount(source: str, target: str, fstype: str, options: list[str]) -> None:
    args = ["mount", "-t", fstype]
    options = filesystem_options(fstype, options)
    if options:
        args += ["-o", ",".join(options)]
    run(*args, source, target)


def bind_mount(source: str, target: str, read_only: bool) -> None:
    run("mount", "--bind", source, target)
    if read_only:  # a bind mount ignores "ro" on creation; it takes a remount
        run("mount", "-o", "remount,bind,ro", target)


def unmount(target: str) -> None:
    """Unmount every layer at target; nothing mounted is fine."""
    while mount_at(target) is not None:
        run("umount", target)


def grow_filesystem(device: str, mount_point: str, fstype: str) -> None:
    if fstype == "xfs":
        run("xfs_growfs", mount_point, timeout=SLOW_TIMEOUT)
        return
    try:
        run("resize2fs", device, timeout=SLOW_TIMEOUT)
    except CommandFailed as e:
        if "Permission denied" in e.stderr:
            raise FailedPrecondition(f"online ext4 resize of {device} was refused by the kernel: the node plugin "
                                     f"needs CAP_SYS_RESOURCE ({e.message})") from e
        raise


def block_device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


T = TypeVar("T")
_inflight: set[str] = set()
_inflight_lock = threading.Lock()


def bounded(key: str, call: Callable[[], T], timeout: float | None = None) -> T | None:
    """call() in a helper thread; None when it has not answered within timeout.

    A statvfs or open() on a dead mount or device can block in the kernel for good; the gRPC
    worker asking must not block with it. A key whose earlier call is still stuck gets None at
    once instead of another stuck thread, so the threads left behind stay one per dead path.
    Exceptions of call() are raised here.
    """
    with _inflight_lock:
        if key in _inflight:
            return None
        _inflight.add(key)
    box: dict[str, T | BaseException] = {}

    def work() -> None:
        try:
            box["value"] = call()
        except BaseException as e:
            box["error"] = e
        finally:
            with _inflight_lock:
                _inflight.discard(key)

    thread = threading.Thread(target=work, name=f"bounded:{key}", daemon=True)
    thread.start()
    thread.join(STATS_TIMEOUT if timeout is None else timeout)
    if thread.is_alive():
        return None
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def statvfs(path: str, timeout: float | None = None) -> os.statvfs_result | None:
    """os.statvfs with a deadline (None: the filesystem did not answer: a dead mount)."""
    return bounded(f"statvfs:{path}", lambda: os.statvfs(path), timeout)
