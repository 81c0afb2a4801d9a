"""Fixtures for tests that run inside the real-kernel VM (hack/vm.sh)."""
from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.environ.get("OPENSDS_IN_VM") != "1":
    raise RuntimeError("e2e/vm runs inside the VM: use `make e2e` (hack/vm.sh), not pytest on the host")

SCRATCH = Path(os.environ["OPENSDS_VM_SCRATCH"])


def sh(*args: str) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@pytest.fixture
def thin_pool() -> Iterator[tuple[str, str]]:
    """A volume group on a loop device with a 1 GiB thin pool; torn down afterwards."""
    vg = f"vg{uuid.uuid4().hex[:6]}"
    image = Path("/run") / f"{vg}.img"  # tmpfs inside the VM: nothing reaches the host
    sh("truncate", "-s", "2G", str(image))
    for module in ("loop", "dm-thin-pool"):
        sh("modprobe", module)
    loop = sh("losetup", "--find", "--show", str(image)).strip()
    sh("pvcreate", "-qq", loop)
    sh("vgcreate", "-qq", vg, loop)
    sh("lvcreate", "-qq", "-L", "1G", "-T", f"{vg}/thinpool")
    yield vg, "thinpool"
    subprocess.run(["vgremove", "-qq", "-f", vg], check=False)
    subprocess.run(["losetup", "-d", loop], check=False)
    image.unlink()


@pytest.fixture(scope="session")
def nvmet() -> None:
    """The kernel NVMe-oF target and host over TCP, with configfs mounted, and loopback up."""
    for module in ("configfs", "nvmet", "nvmet-tcp", "nvme-tcp"):
        sh("modprobe", module)
    if not Path("/sys/kernel/config/nvmet").exists():
        sh("mount", "-t", "configfs", "none", "/sys/kernel/config")
    sh("ip", "link", "set", "lo", "up")


@pytest.fixture(scope="session")
def lio() -> Iterator[None]:
    """LIO (the kernel iSCSI target) and an open-iscsi initiator: iscsid with its state on tmpfs.

    The host's /etc/iscsi is shared read-only into the VM; a tmpfs over it (and over
    /var/lib/iscsi where that exists) gives iscsid its writable node/iface database, inside the VM only.
    """
    for module in ("configfs", "target_core_mod", "iscsi_target_mod", "target_core_iblock", "iscsi_tcp"):
        sh("modprobe", module)
    if not Path("/sys/kernel/config/target").exists():
        sh("mount", "-t", "configfs", "none", "/sys/kernel/config")
    sh("ip", "link", "set", "lo", "up")
    conf = Path("/etc/iscsi/iscsid.conf").read_text() if Path("/etc/iscsi/iscsid.conf").exists() else ""
    for directory in ("/etc/iscsi", "/var/lib/iscsi"):
        if Path(directory).is_dir():
            sh("mount", "-t", "tmpfs", "tmpfs", directory)
    Path("/etc/iscsi/iscsid.conf").write_text(conf)
    Path("/etc/iscsi/initiatorname.iscsi").write_text("InitiatorName=iqn.2024-11.io.opensds:vm-default\n")
    Path("/run/lock/iscsi").mkdir(parents=True, exist_ok=True)
    sh("iscsid")
    yield
    subprocess.run(["iscsiadm", "-m", "node", "--logoutall=all"], capture_output=True)
    subprocess.run(["pkill", "-x", "iscsid"], capture_output=True)
