"""Integration fixtures: a real kube-apiserver (hack/cluster.sh) with our CRDs installed.

The control plane is session-scoped: started when absent (and stopped again at the end
unless OPENSDS_KEEP_CLUSTER=1), reused when a developer already runs one. Each test gets
its own namespace, deleted afterwards.
"""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = ROOT / "hack" / "cluster.sh"
CLUSTER_DIR = Path(os.environ.get("OPENSDS_CLUSTER_DIR", ROOT / ".cluster"))
KUBECONFIG = CLUSTER_DIR / "admin.kubeconfig"
KUBECTL = ROOT / "bin" / "kubectl"


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    api: client.ApiClient

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(KUBECTL), "--kubeconfig", str(self.kubeconfig), *args], capture_output=True, text=True
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result


def _wait_established(cluster: Cluster, names: list[str], timeout: float = 60) -> None:
    ext = client.ApiextensionsV1Api(cluster.api)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            crd = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])}
            if conds.get("Established") == "True":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not established")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    running = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True).returncode == 0
    if not running:
        subprocess.run(["bash", str(CLUSTER_SH), "up"], check=True)
    api = config.new_client_from_config(config_file=str(KUBECONFIG))
    c = Cluster(kubeconfig=KUBECONFIG, api=api)
    crd_dirs = [ROOT / "crds", ROOT / "bin" / "snapshot-crds"]
    c.kubectl("apply", "--server-side", "--force-conflicts", *[f"-f={d}" for d in crd_dirs])
    names = [
        f"{p}.opensds.io" for p in ("storagebackends", "storageprofiles", "volumes", "snapshots")
    ] + [f"volumesnapshot{s}.snapshot.storage.k8s.io" for s in ("s", "classes", "contents")]
    _wait_established(c, names)
    yield c
    api.close()
    if not running and os.environ.get("OPENSDS_KEEP_CLUSTER") != "1":
        subprocess.run(["bash", str(CLUSTER_SH), "down"], check=True)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of the test's own, deleted (without waiting) when the test ends."""
    short = request.node.name.lower().replace("_", "-")[:40].strip("-")
    name = f"t-{short}-{uuid.uuid4().hex[:5]}"
    core = client.CoreV1Api(cluster.api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)
