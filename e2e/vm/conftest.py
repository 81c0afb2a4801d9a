"""Fixtures for tests that run inside the real-kernel VM (hack/vm.sh)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import kernel
from .nodeplugin import Node

if os.environ.get("OPENSDS_IN_VM") != "1":
    raise RuntimeError("e2e/vm runs inside the VM: use `make e2e` (hack/vm.sh), not pytest on the host")

SCRATCH = Path(os.environ["OPENSDS_VM_SCRATCH"])
sh = kernel.sh


@pytest.fixture
def thin_pool() -> Iterator[tuple[str, str]]:
    """A volume group on a loop device with a 1 GiB thin pool; torn down afterwards."""
    with kernel.thin_pool() as pool:
        yield pool


@pytest.fixture(scope="session")
def nvmet() -> None:
    kernel.start_nvmet()


@pytest.fixture(scope="session")
def lio() -> Iterator[None]:
    with kernel.lio_and_iscsid():
        yield


@pytest.fixture(scope="session")
def ceph() -> Iterator[tuple[str, str]]:
    """Ceph inside the VM (2 to 8 minutes to HEALTH_OK under TCG): (ceph.conf, client.opensds key)."""
    kernel.sh("ip", "link", "set", "lo", "up")
    yield kernel.start_ceph()
    kernel.stop_ceph()


@pytest.fixture
def node() -> Iterator[Node]:
    """A CSI node plugin for node id `node-a` on its own socket."""
    node = Node("node-a")
    yield node
    node.close()
