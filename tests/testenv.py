"""The one place that says where the tests' own control plane and Ceph live.

`make up` runs its system on .cluster/ (apiserver 16443, etcd 23790) and .ceph/ (mon 13300),
with its processes under .run/. The tests never touch those: they get their own state
directories and ports (defaults below; OPENSDS_TEST_* overrides them), exported as the
OPENSDS_CLUSTER_DIR/OPENSDS_API_PORT/OPENSDS_ETCD_PORT/OPENSDS_CEPH_DIR/OPENSDS_CEPH_PORT
that hack/cluster.sh and hack/ceph.sh read. tests/conftest.py applies this before any test
module is imported, so `make test` and `pytest tests/...` run by hand are the same, and both
can run while `make up`'s system is up. (The general OPENSDS_CLUSTER_DIR a developer may have
exported for `make up` is deliberately not honoured here.)

Objects the tests create in the cluster carry TEST_LABEL, so a session can find and remove
what an interrupted earlier one left behind (see integration/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CLUSTER_DIR = Path(os.environ.get("OPENSDS_TEST_CLUSTER_DIR", ROOT / ".cluster-test"))
API_PORT = int(os.environ.get("OPENSDS_TEST_API_PORT", "26443"))    # +1 controller-manager, +2 scheduler
ETCD_PORT = int(os.environ.get("OPENSDS_TEST_ETCD_PORT", "25790"))  # +10 peer, +20 metrics
CEPH_DIR = Path(os.environ.get("OPENSDS_TEST_CEPH_DIR", ROOT / ".ceph-test"))
CEPH_PORT = int(os.environ.get("OPENSDS_TEST_CEPH_PORT", "15300"))  # +1 v1, +100..+199 daemons
KUBECONFIG = CLUSTER_DIR / "admin.kubeconfig"

# What `make up` (hack/up.sh, hack/cluster.sh and hack/ceph.sh defaults) uses: never ours.
UP_CLUSTER_DIR, UP_API_PORT, UP_ETCD_PORT = ROOT / ".cluster", 16443, 23790
UP_CEPH_DIR, UP_CEPH_PORT = ROOT / ".ceph", 13300

TEST_LABEL = "test.opensds.io/made-by"
TEST_LABEL_VALUE = "pytest"
LABELS = {TEST_LABEL: TEST_LABEL_VALUE}


def labelled(metadata: dict[str, object]) -> dict[str, object]:
    """metadata with the test label added (for objects the tests create in the cluster)."""
    labels = dict(metadata.get("labels") or {})  # type: ignore[call-overload]
    return {**metadata, "labels": {**labels, **LABELS}}


def env() -> dict[str, str]:
    return {
        "OPENSDS_CLUSTER_DIR": str(CLUSTER_DIR),
        "OPENSDS_API_PORT": str(API_PORT),
        "OPENSDS_ETCD_PORT": str(ETCD_PORT),
        "OPENSDS_CEPH_DIR": str(CEPH_DIR),
        "OPENSDS_CEPH_PORT": str(CEPH_PORT),
    }


def apply() -> None:
    """Export the tests' cluster and Ceph settings to this process and every tool it starts;
    refuse settings that would share `make up`'s state or ports."""
    clashes = []
    if CLUSTER_DIR.resolve() == UP_CLUSTER_DIR.resolve():
        clashes.append(f"cluster dir {CLUSTER_DIR}")
    if CEPH_DIR.resolve() == UP_CEPH_DIR.resolve():
        clashes.append(f"Ceph dir {CEPH_DIR}")
    up_ports = {UP_API_PORT, UP_API_PORT + 1, UP_API_PORT + 2, UP_ETCD_PORT, UP_ETCD_PORT + 10, UP_ETCD_PORT + 20}
    ours = {API_PORT, API_PORT + 1, API_PORT + 2, ETCD_PORT, ETCD_PORT + 10, ETCD_PORT + 20}
    if ours & up_ports:
        clashes.append(f"ports {sorted(ours & up_ports)}")
    if abs(CEPH_PORT - UP_CEPH_PORT) < 200:
        clashes.append(f"Ceph ports {CEPH_PORT}..{CEPH_PORT + 199}")
    if clashes:
        raise SystemExit(f"tests: {', '.join(clashes)} would be shared with `make up`'s system; "
                         f"pick others with OPENSDS_TEST_CLUSTER_DIR/_API_PORT/_ETCD_PORT/_CEPH_DIR/_CEPH_PORT")
    os.environ.update(env())


def require_root_and_loop_devices() -> None:
    """The node plugin tests attach loop devices, format and mount: the README's supported machine
    (Debian 12, as root) has all of it. Anywhere else this is a failure naming what is missing,
    never a skip."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (run the tests as root, as the README says)")
    if not Path("/dev/loop-control").exists():
        missing.append("/dev/loop-control (the loop driver: `modprobe loop`)")
    if missing:
        pytest.fail("this test needs " + " and ".join(missing), pytrace=False)


def free_loop_device() -> str:
    """A loop device node that exists (losetup allocates one through /dev/loop-control if needed)."""
    require_root_and_loop_devices()
    return subprocess.run(["losetup", "--find"], capture_output=True, text=True, check=True).stdout.strip()
