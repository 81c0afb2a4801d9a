"""Filesystems and mounts on the node: what is mounted where (from mountinfo), mkfs, mount, grow."""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import FailedPrecondition, InvalidArgument
from .run import CommandFailed, run

SUPPORTED_FILESYSTEMS = ("ext4", "xfs")
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


def detect_filesystem(device: str) -> str | None:
    """The filesystem on a device, None when it is blank (blkid exits 2 when it finds nothing)."""
    result = run("blkid", "-p", "-o", "export", device, ok_codes=(0, 2))
    if result.returncode == 2:
        return None
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return values.get("TYPE") or None


def make_filesystem(device: str, fstype: str) -> None:
    if fstype == "ext4":
        run("mkfs.ext4", "-F", "-q", "-E", "nodiscard,lazy_itable_init=1", device)
    elif fstype == "xfs":
        run("mkfs.xfs", "-q", "-K", device)
    else:
        raise InvalidArgument(f"fs_type {fstype!r} is not supported ({', '.join(SUPPORTED_FILESYSTEMS)})")


def mount(source: str, target: str, fstype: str, options: list[str]) -> None:
    args = ["mount", "-t", fstype]
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
        run("xfs_growfs", mount_point)
        return
    try:
        run("resize2fs", device)
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
