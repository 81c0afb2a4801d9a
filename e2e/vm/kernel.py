"""Kernel-side setup inside the VM, shared by the e2e fixtures and bench/datapath.py.

Everything lands on the VM's own tmpfs and loopback: nothing reaches the host.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path


def sh(*args: str) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def thin_pool(size: str = "2G", pool_size: str = "1G") -> Iterator[tuple[str, str]]:
    """A volume group on a loop device (tmpfs file) with a thin pool; torn down afterwards."""
    vg = f"vg{uuid.uuid4().hex[:6]}"
    image = Path("/run") / f"{vg}.img"
    sh("truncate", "-s", size, str(image))
    for module in ("loop", "dm-thin-pool"):
        sh("modprobe", module)
    loop = sh("losetup", "--find", "--show", str(image)).strip()
    try:
        sh("pvcreate", "-qq", loop)
        sh("vgcreate", "-qq", vg, loop)
        sh("lvcreate", "-qq", "-L", pool_size, "-T", f"{vg}/thinpool")
        yield vg, "thinpool"
    finally:
        subprocess.run(["vgremove", "-qq", "-f", vg], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)
        image.unlink()


def _configfs(*modules: str) -> None:
    for module in ("configfs", *modules):
        sh("modprobe", module)
    if not Path("/sys/kernel/config/nvmet").exists() and not Path("/sys/kernel/config/target").exists():
        sh("mount", "-t", "configfs", "none", "/sys/kernel/config")
    sh("ip", "link", "set", "lo", "up")


def start_nvmet() -> None:
    """The kernel NVMe-oF target and host over TCP, configfs mounted, loopback up."""
    _configfs("nvmet", "nvmet-tcp", "nvme-tcp")


NVMET = Path("/sys/kernel/config/nvmet")


def clear_nvmet() -> None:
    """Remove every nvmet configfs item (ports, subsystems, hosts): nvmet can then be unloaded."""
    for port in NVMET.glob("ports/*"):
        for link in (port / "subsystems").iterdir():
            link.unlink()
    for subsystem in NVMET.glob("subsystems/*"):
        for link in (subsystem / "allowed_hosts").iterdir():
            link.unlink()
        for namespace in (subsystem / "namespaces").iterdir():
            (namespace / "enable").write_text("0")
            namespace.rmdir()
        subsystem.rmdir()
    for item in (*NVMET.glob("ports/*"), *NVMET.glob("hosts/*")):
        item.rmdir()


@contextlib.contextmanager
def nvme_host_without_multipath() -> Iterator[None]:
    """nvme_core reloaded with multipath=N: two controllers of one subsystem (two host NQNs on this
    one machine, standing for two nodes) become two block devices instead of two paths of one.

    nvmet depends on nvme_core, so the target is reloaded too (its configfs tree must be empty);
    afterwards everything is reloaded with native multipath again, as the other tests expect.
    """
    stack = ("nvme_tcp", "nvmet_tcp", "nvmet", "nvme_fabrics", "nvme_core")

    def reload(multipath: str) -> None:
        subprocess.run(["nvme", "disconnect-all"], capture_output=True)
        clear_nvmet()
        for module in stack:
            if Path("/sys/module", module).exists():
                sh("rmmod", module)
        sh("modprobe", "nvme_core", f"multipath={multipath}")
        start_nvmet()

    reload("N")
    try:
        yield
    finally:
        reload("Y")


@contextlib.contextmanager
def lio_and_iscsid() -> Iterator[None]:
    """LIO (the kernel iSCSI target) and an open-iscsi initiator: iscsid with its state on tmpfs.

    The host's /etc/iscsi is shared read-only into the VM; a tmpfs over it (and over
    /var/lib/iscsi where that exists) gives iscsid its writable node/iface database, inside the VM only.
    """
    _configfs("target_core_mod", "iscsi_target_mod", "target_core_iblock", "iscsi_tcp")
    conf = Path("/etc/iscsi/iscsid.conf").read_text() if Path("/etc/iscsi/iscsid.conf").exists() else ""
    for directory in ("/etc/iscsi", "/var/lib/iscsi"):
        if Path(directory).is_dir():
            sh("mount", "-t", "tmpfs", "tmpfs", directory)
    Path("/etc/iscsi/iscsid.conf").write_text(conf)
    Path("/etc/iscsi/initiatorname.iscsi").write_text("InitiatorName=iqn.2024-11.io.opensds:vm-default\n")
    Path("/run/lock/iscsi").mkdir(parents=True, exist_ok=True)
    sh("iscsid")
    try:
        yield
    finally:
        subprocess.run(["iscsiadm", "-m", "node", "--logoutall=all"], capture_output=True)
        subprocess.run(["pkill", "-x", "iscsid"], capture_output=True)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup2() -> Path:
    """cgroup v2 mounted at /sys/fs/cgroup (virtme-ng may leave it unmounted)."""
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        sh("mount", "-t", "cgroup2", "none", str(CGROUP_ROOT))
    return CGROUP_ROOT


def pod_cgroup(pod_uid: str) -> Path:
    """The cgroup kubelet's cgroupfs driver would make for a Burstable pod."""
    path = cgroup2() / "kubepods" / "burstable" / f"pod{pod_uid}"
    path.mkdir(parents=True, exist_ok=True)
    return path


CEPH_DIR = Path("/run/ceph")  # tmpfs inside the VM (bluestore opens its block file O_DIRECT: kernel >= 6.6)


def start_ceph() -> tuple[str, str]:
    """A real one-OSD Ceph cluster on the VM's own loopback (hack/ceph.sh); returns (conf, client.opensds key)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OPENSDS_CEPH_DIR": str(CEPH_DIR)}
    done = subprocess.run(["bash", str(root / "hack" / "ceph.sh"), "up"], capture_output=True, text=True, env=env)
    # ceph.sh gives the new cluster 60 s to report HEALTH_OK and the pool's statistics; under TCG on
    # a loaded host that took longer (its own `health detail` then said HEALTH_OK). The cluster is
    # made by then and its daemons keep running: give it more time before failing.
    healthy, deadline = done.returncode == 0, time.monotonic() + 600
    while not healthy and time.monotonic() < deadline:
        time.sleep(2)
        healthy = subprocess.run(["bash", str(root / "hack" / "ceph.sh"), "status"], capture_output=True,
                                 env=env).returncode == 0
    if not healthy:
        raise RuntimeError(f"hack/ceph.sh up failed: {done.stdout}{done.stderr}")
    keyring = (CEPH_DIR / "client.opensds.keyring").read_text()
    key = next(line.split("=", 1)[1].strip() for line in keyring.splitlines() if line.strip().startswith("key"))
    sh("modprobe", "rbd")
    return str(CEPH_DIR / "ceph.conf"), key


def stop_ceph() -> None:
    root = Path(__file__).resolve().parents[2]
    subprocess.run(["bash", str(root / "hack" / "ceph.sh"), "down"], capture_output=True,
                   env={**os.environ, "OPENSDS_CEPH_DIR": str(CEPH_DIR)})
