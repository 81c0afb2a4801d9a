"""Node-side QoS: a profile's maxIOPS / maxBPS as blk-cgroup `io.max` on the pod's cgroup.

The dock writes the limits into publish_context; NodePublish finds the pod's cgroup from the
pod UID kubelet passes (CSIDriver `podInfoOnMount: true`) and writes one `io.max` line for the
volume's device, so every process of the pod, and the writeback of its dirty pages, is
throttled on that device only. blk-throttle limits each direction: reads and writes are capped
at the limit separately. The pod's cgroup disappears with the pod; NodeUnpublish still lifts
the line when it is there (a republish with other limits starts clean).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from opensds_operator.qos import IoLimits

from .errors import FailedPrecondition

log = logging.getLogger(__name__)
CGROUP_ROOT = Path("/sys/fs/cgroup")
POD_UID_KEY = "csi.storage.k8s.io/pod.uid"


def pod_cgroup(pod_uid: str, root: Path = CGROUP_ROOT) -> Path | None:
    """The pod's cgroup under either kubelet cgroup driver.

    cgroupfs: kubepods/[burstable|besteffort/]pod<uid>; systemd:
    kubepods.slice/[kubepods-burstable.slice/]kubepods-[burstable-]pod<uid_with_underscores>.slice.
    """
    plain, systemd = f"pod{pod_uid}", f"pod{pod_uid.replace('-', '_')}.slice"
    for top in sorted(root.glob("kubepods*")):
        for candidate in (top, *top.glob("*"), *top.glob("*/*")):
            if candidate.is_dir() and (candidate.name == plain or candidate.name.endswith(systemd)):
                return candidate
    return None


def device_number(device: str) -> str:
    """"MAJ:MIN" of a block device node, the key io.max is written under."""
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def limit_line(devno: str, limits: IoLimits) -> str:
    iops = str(limits.iops) if limits.iops else "max"
    bps = str(limits.bps) if limits.bps else "max"
    return f"{devno} riops={iops} wiops={iops} rbps={bps} wbps={bps}"


def _enable_io_controller(cgroup: Path, root: Path) -> None:
    """io.max exists only where the parent delegates the io controller: enable it down the path."""
    if (cgroup / "io.max").exists():
        return
    parents = [p for p in reversed(cgroup.parents) if p == root or root in p.parents]
    for parent in parents:
        control = parent / "cgroup.subtree_control"
        if "io" not in control.read_text().split():
            control.write_text("+io")


def apply(cgroup: Path, device: str, limits: IoLimits, root: Path = CGROUP_ROOT) -> None:
    _enable_io_controller(cgroup, root)
    line = limit_line(device_number(device), limits)
    try:
        (cgroup / "io.max").write_text(line)
    except OSError as e:
        raise FailedPrecondition(f"cannot write io.max of {cgroup} ({line}): {e}") from e
    log.info("io.max of %s: %s", cgroup, line)


def lift(cgroup: Path, device: str) -> None:
    """Remove the limit (setting every field to max deletes the line); gone cgroups need nothing."""
    io_max = cgroup / "io.max"
    if not io_max.exists() or not Path(device).exists():
        return
    try:
        io_max.write_text(limit_line(device_number(device), IoLimits()))
    except OSError as e:  # the pod is being torn down; its cgroup goes with it
        log.info("io.max of %s not reset: %s", cgroup, e)
