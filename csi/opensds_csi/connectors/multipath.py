"""dm-multipath over the path disks of one LUN, with multipath-tools.

The WWID is added to multipath's wwids file (`multipath -a`, so `find_multipaths` accepts it)
and the map made with `multipath`; multipathd, when it runs, keeps paths checked and
reinstated. A map is only accepted once it holds every path, and it is removed before its
paths go away, so no pathless map is ever left queueing I/O.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import FailedPrecondition
from ..run import run
from .base import sys_block


def is_map(device: str | None) -> bool:
    uuid = sys_block(device or "-") / "dm" / "uuid"
    return uuid.exists() and uuid.read_text().startswith("mpath-")


def map_over(disks: list[str]) -> str | None:
    """The dm-multipath device holding these path disks, if one does."""
    for disk in disks:
        for holder in sorted((sys_block(disk) / "holders").glob("dm-*")):
            if is_map(f"/dev/{holder.name}"):
                return f"/dev/{holder.name}"
    return None


def slaves(device: str) -> set[str]:
    return {p.name for p in (sys_block(device) / "slaves").iterdir()}


def assemble(disks: list[str]) -> str | None:
    """The map over all of `disks`, made or completed if needed; None until it holds every one."""
    names = {Path(d).name for d in disks}
    existing = map_over(disks)
    if existing is None:
        run("multipath", "-a", disks[0], ok_codes=(0, 1))  # whitelist the WWID (find_multipaths)
        run("multipath", disks[0], ok_codes=(0, 1))
    elif slaves(existing) < names:
        run("multipath", "-r", existing, ok_codes=(0, 1))  # a path udev had not finished with: add it
    existing = map_over(disks)
    return existing if existing and slaves(existing) >= names else None


def remove(device: str, attempts: int = 20) -> None:
    """Flush and remove a map, retrying while udev or blkid still hold it briefly.

    A map left behind after logout would have no paths and queue I/O forever, so failing here
    (NodeUnstage is retried) beats logging out under it.
    """
    block = sys_block(device)
    try:
        name = (block / "dm" / "name").read_text().strip()  # the map's name (its WWID)
    except FileNotFoundError:
        return
    run("dmsetup", "message", name, "0", "fail_if_no_path", ok_codes=(0, 1))
    for _ in range(attempts):
        run("multipath", "-f", name, ok_codes=(0, 1))
        if not block.exists():
            return
        time.sleep(0.25)
    raise FailedPrecondition(f"multipath map {device} is still in use; not logging out its paths")


def reload(device: str) -> None:
    """Take the paths' new size after they were rescanned."""
    run("multipath", "-r", device, ok_codes=(0, 1))
