"""Transport `local`: the volume is a file (file backend -> loop device) or a block device on this node."""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping

from ..errors import FailedPrecondition, InvalidArgument
from ..run import CommandFailed, run


def _loops_backing(path: str) -> list[str]:
    """Loop devices whose backing file is `path` (from `losetup --json`, never scraped text)."""
    out = run("losetup", "--json", "--list", "--output", "NAME,BACK-FILE").stdout
    devices = json.loads(out).get("loopdevices", []) if out.strip() else []
    real = os.path.realpath(path)
    return [d["name"] for d in devices if (d.get("back-file") or "").removesuffix(" (deleted)") == real]


class LocalConnector:
    def attach(self, volume_id: str, context: Mapping[str, str], secrets: Mapping[str, str]) -> str:
        path = context.get("path")
        if not path:
            raise InvalidArgument(f"publish_context of {volume_id} has no 'path'")
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError as e:
            raise FailedPrecondition(f"{path} of volume {volume_id} does not exist on this node") from e
        if stat.S_ISBLK(mode):
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
        path = context.get("path", "")
        if path and os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode):
            return  # a local block device is not ours to detach
        # Only loops backed by this volume's file: after a reboot a remembered /dev/loopN may
        # belong to another volume.
        for loop in _loops_backing(path) if path else []:
            run("losetup", "--detach", loop, ok_codes=(0, 1))  # 1: already gone

    def refresh(self, device: str) -> None:
        if device.startswith("/dev/loop"):
            run("losetup", "--set-capacity", device)
