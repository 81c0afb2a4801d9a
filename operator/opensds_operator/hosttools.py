"""Which Debian package provides each host tool the dock and the CSI node run.

One table for both sides (the CSI plugin already imports `opensds_operator`; nothing here
imports anything of ours): a tool that is not installed is reported as "<tool> not found on
this node: install the Debian package <package>" instead of a bare FileNotFoundError.
hack/deps.sh installs these packages (group "node tools").
"""
from __future__ import annotations

import os

PACKAGES: dict[str, str] = {
    # filesystems
    "mkfs.xfs": "xfsprogs",
    "xfs_growfs": "xfsprogs",
    "xfs_repair": "xfsprogs",
    "mkfs.ext4": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "fsck.ext4": "e2fsprogs",
    # block devices and mounts
    "blkid": "util-linux",
    "blockdev": "util-linux",
    "wipefs": "util-linux",
    "findmnt": "util-linux",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "modprobe": "kmod",
    "parted": "parted",
    # transports
    "nvme": "nvme-cli",
    "iscsiadm": "open-iscsi",
    "multipath": "multipath-tools",
    "dmsetup": "dmsetup",
    "rbd": "ceph-common",
    "ceph": "ceph-common",
    # LVM (the dock's lvm driver)
    "lvm": "lvm2",
    "lvs": "lvm2",
    "vgs": "lvm2",
    "pvs": "lvm2",
    "lvcreate": "lvm2",
    "lvremove": "lvm2",
    "lvextend": "lvm2",
    "lvchange": "lvm2",
    "lvrename": "lvm2",
    "thin_check": "thin-provisioning-tools",
}


def package_of(tool: str) -> str | None:
    """The Debian package that installs `tool` (a name or a path), or None when we do not know it."""
    return PACKAGES.get(os.path.basename(tool))


def missing_tool_message(tool: str) -> str:
    """What to tell an operator when `tool` is not installed on this node."""
    name = os.path.basename(tool)
    package = package_of(name)
    if package is None:
        return f"{name} not found on this node (not on PATH)"
    return f"{name} not found on this node: install the Debian package {package}"


def is_missing_executable(error: OSError, args: list[str] | tuple[str, ...]) -> bool:
    """Whether an OSError from starting `args` means the executable itself is absent.

    subprocess raises FileNotFoundError naming the program (error.filename) when it is not on
    PATH; a FileNotFoundError about anything else (a missing cwd, a device) is not this."""
    if not isinstance(error, FileNotFoundError) or not args:
        return False
    return error.filename in (None, args[0]) or os.path.basename(str(error.filename)) == os.path.basename(args[0])
