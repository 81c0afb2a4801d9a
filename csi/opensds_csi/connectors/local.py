"""Transport `local`: the volume is a file (file backend -> loop device) or an LV on this node.

publish_context["path"] is accepted only when it names this volume inside the node's local
roots (`--local-root`, repeatable; default /var/lib/opensds, where the dock DaemonSet keeps
its file backends):
- a file backend image: a regular file named `vol-<uid>.img` whose real path (symlinks
  resolved) is under a root and keeps that name, and that no group or other may write;
- an LVM volume: the path LVM itself makes, `/dev/<vg>/vol-<uid>`, whose VG directory is under
  a root (`--local-root /dev/<vg>` per VG, or `/dev` for every VG), and whose block device is
  a device-mapper LVM volume (dm uuid `LVM-...`) named exactly `<vg>/vol-<uid>` (dm name).
A host disk, /etc/shadow, a symlink out of a root or another volume's file are refused before
anything is attached (losetup is never run on them).
"""
from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from opensds_operator.api import CTX_PATH, CTX_TRANSPORT, valid_uid

from ..errors import FailedPrecondition, InvalidArgument
from ..run import CommandFailed, run
from .base import context_field

DEFAULT_LOCAL_ROOTS = ("/var/lib/opensds",)
_NAME = re.compile(r"vol-(?P<uid>[0-9a-f-]{36})(?P<img>\.img)?")
SYS_DEV_BLOCK = Path("/sys/dev/block")


def _loops_backing(path: str) -> list[str]:
    """Loop devices whose backing file is `path` (from `losetup --json`, never scraped text)."""
    out = run("losetup", "--json", "--list", "--output", "NAME,BACK-FILE").stdout
    devices = json.loads(out).get("loopdevices", []) if out.strip() else []
    real = os.path.realpath(path)
    return [d["name"] for d in devices if (d.get("back-file") or "").removesuffix(" (deleted)") == real]


def dm_lvm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives vg/lv (a '-' inside either name is doubled)."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def is_lvm_volume(vg: str, lv: str, dm_name: str, dm_uuid: str) -> bool:
    """Whether a dm device (its sysfs dm/name and dm/uuid) is the LVM logical volume vg/lv."""
    return dm_uuid.startswith("LVM-") and dm_name == dm_lvm_name(vg, lv)


def _dm_identity(rdev: int) -> tuple[str, str]:
    dm = SYS_DEV_BLOCK / f"{os.major(rdev)}:{os.minor(rdev)}" / "dm"
    try:
        return (dm / "name").read_text().strip(), (dm / "uuid").read_text().strip()
    except OSError:
        return "", ""


def under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


class LocalConnector:
    def __init__(self, roots: Sequence[str] = DEFAULT_LOCAL_ROOTS) -> None:
        self.roots = [Path(os.path.realpath(r)) for r in roots]

    def volume_uid(self, volume_id: str, context: Mapping[str, str]) -> str:
        path = context_field(volume_id, context, CTX_PATH)
        match = _NAME.fullmatch(os.path.basename(path))
        if not match or not valid_uid(match["uid"]):
            raise InvalidArgument(f"publish_context of {volume_id}: path {path!r} is not named vol-<uid>.img "
                                  f"(file backend) or vol-<uid> (LVM); refusing it")
        return match["uid"]

    def _roots_text(self) -> str:
        return ", ".join(str(r) for r in self.roots) or "none"

    def checked_path(self, volume_id: str, context: Mapping[str, str]) -> str:
        """The path to attach, once it is proven to be this volume's image or LV (see module doc)."""
        self.volume_uid(volume_id, context)
        path = context[CTX_PATH]
        if not os.path.isabs(path):
            raise InvalidArgument(f"publish_context of {volume_id}: path {path!r} is not absolute")
        name = os.path.basename(path)
        try:
            st = os.stat(path)
        except FileNotFoundError as e:
            raise FailedPrecondition(f"{path} of volume {volume_id} does not exist on this node") from e
        if stat.S_ISREG(st.st_mode):
            real = Path(os.path.realpath(path))
            if not name.endswith(".img") or real.name != name:
                raise FailedPrecondition(f"{path} of volume {volume_id} resolves to {real}, not a {name} image; "
                                         f"refusing it")
            if not under(real, self.roots):
                raise FailedPrecondition(f"{path} of volume {volume_id} (real path {real}) is outside this node's "
                                         f"local roots ({self._roots_text()}); refusing it (see --local-root)")
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise FailedPrecondition(f"{real} of volume {volume_id} is writable by group or others "
                                         f"(mode {stat.S_IMODE(st.st_mode):o}); refusing it")
            return str(real)
        if stat.S_ISBLK(st.st_mode):
            parent = Path(path).parent
            vg = parent.name
            if name.endswith(".img") or parent.parent != Path("/dev") or not vg:
                raise FailedPrecondition(f"{path} of volume {volume_id} is a block device but not an LVM volume "
                                         f"path /dev/<vg>/vol-<uid>; refusing it")
            if not under(Path(os.path.realpath(parent)), self.roots):
                raise FailedPrecondition(f"volume group directory {parent} of volume {volume_id} is outside this "
                                         f"node's local roots ({self._roots_text()}); refusing it (see --local-root)")
            dm_name, dm_uuid = _dm_identity(st.st_rdev)
            if not is_lvm_volume(vg, name, dm_name, dm_uuid):
                raise FailedPrecondition(f"{path} of volume {volume_id} is not the LVM volume {vg}/{name} "
                                         f"(device-mapper name {dm_name or 'none'}); refusing it")
            return path
        raise FailedPrecondition(f"{path} of volume {volume_id} is neither a regular file nor a block device")

    def attach(self, volume_id: str, context: Mapping[str, str], secrets: Mapping[str, str]) -> str:
        path = self.checked_path(volume_id, context)
        if stat.S_ISBLK(os.stat(path).st_mode):
            return path
        existing = _loops_backing(path)
        if existing:
            return existing[0]
        if not os.path.exists("/dev/loop-control"):  # loop is a module on most distributions
            run("modprobe", "loop", ok_codes=(0, 1))
        try:
            return run("losetup", "--find", "--show", "--direct-io=on", path).stdout.strip()
        except CommandFailed:  # direct I/O needs an aligned backing filesystem; buffered works everywhere
            return run("losetup", "--find", "--show", path).stdout.strip()

    def detach(self, volume_id: str, context: Mapping[str, str], device: str | None) -> None:
        path = context.get(CTX_PATH, "")
        if path and os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode):
            return  # a local block device is not ours to detach
        # Only loops backed by this volume's file: after a reboot a remembered /dev/loopN may
        # belong to another volume.
        for loop in _loops_backing(path) if path else []:
            run("losetup", "--detach", loop, ok_codes=(0, 1))  # 1: already gone

    def refresh(self, device: str) -> None:
        if device.startswith("/dev/loop"):
            run("losetup", "--set-capacity", device)

    def identify(self, device: str) -> dict[str, str] | None:
        backing = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
        try:
            path = backing.read_text().strip().removesuffix(" (deleted)")
        except OSError:
            return None
        return {CTX_TRANSPORT: "local", CTX_PATH: path} if _NAME.fullmatch(os.path.basename(path)) else None
