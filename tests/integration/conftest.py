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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

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


@dataclass(frozen=True)
class Stack:
    """The operator and one dock serving a file StorageBackend, as real processes."""
    backend: str
    backend_dir: Path


def service_account_kubeconfig(cluster: Cluster, account: str, path: Path) -> Path:
    """A kubeconfig holding a token of manifests/base's ServiceAccount: runs a component with
    exactly the RBAC we ship, so a missing permission fails the tests."""
    token = client.CoreV1Api(cluster.api).create_namespaced_service_account_token(
        account, "opensds-system",
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=["https://kubernetes.default.svc.cluster.local"], expiration_seconds=86400)),
    ).status.token
    admin = yaml.safe_load(KUBECONFIG.read_text())
    admin["users"] = [{"name": account, "user": {"token": token}}]
    admin["contexts"][0]["context"]["user"] = account
    path.write_text(yaml.safe_dump(admin))
    path.chmod(0o600)
    return path


def _spawn(args: list[str], log_path: Path, kubeconfig: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


class Processes:
    """Starts, kills and restarts the operator and dock (the crash tests need all three)."""

    def __init__(self, backend: str, logs: Path, kubeconfigs: dict[str, Path]) -> None:
        self.backend, self.logs, self.kubeconfigs = backend, logs, kubeconfigs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, which: str) -> None:
        venv_bin = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
        if which == "operator":
            args = [str(venv_bin / "opensds-operator")]
        else:
            args = [str(venv_bin / "opensds-dock"), "--backend", self.backend, "--capacity-interval", "5"]
        if os.environ.get("OPENSDS_TEST_VERBOSE") == "1":
            args.append("--verbose")
        self.procs[which] = _spawn(args, self.logs / f"{which}.log", self.kubeconfigs[which])

    def kill(self, which: str) -> None:
        proc = self.procs.pop(which, None)
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop_all(self) -> None:
        for which in list(self.procs):
            proc = self.procs.pop(which)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="session")
def processes(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    base = tmp_path_factory.mktemp("stack")
    backend = f"file-{uuid.uuid4().hex[:6]}"
    api = client.CustomObjectsApi(cluster.api)
    api.create_cluster_custom_object("opensds.io", "v1alpha1", "storagebackends", {
        "apiVersion": "opensds.io/v1alpha1", "kind": "StorageBackend", "metadata": {"name": backend},
        "spec": {"driver": "file", "nodeName": "node-1", "topology": {"topology.opensds.io/zone": "z1"},
                 "parameters": {"path": str(base / "backend"), "capacity": "8Gi"}},
    })
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "manifests/base/namespace.yaml"))
    for rbac in ("rbac-operator.yaml", "rbac-dock.yaml"):
        cluster.kubectl("apply", "--server-side", "-n", "opensds-system", "-f", str(ROOT / "manifests/base" / rbac))
    kubeconfigs = {
        "operator": service_account_kubeconfig(cluster, "opensds-operator", base / "operator.kubeconfig"),
        "dock": service_account_kubeconfig(cluster, "opensds-dock", base / "dock.kubeconfig"),
    }
    procs = Processes(backend, base, kubeconfigs)
    procs.start("operator")
    procs.start("dock")
    yield procs
    # Leave the cluster as we found it: the operator releases the backend once no Volume uses it.
    api.delete_cluster_custom_object("opensds.io", "v1alpha1", "storagebackends", backend)
    try:
        wait_for(lambda: not _exists(api, "storagebackends", backend), 60, f"StorageBackend {backend} deleted")
    finally:
        procs.stop_all()
        print(f"operator/dock logs in {base}")


def _exists(api: client.CustomObjectsApi, plural: str, name: str) -> bool:
    try:
        api.get_cluster_custom_object("opensds.io", "v1alpha1", plural, name)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


@pytest.fixture(scope="session")
def stack(processes: Processes, cluster: Cluster) -> Stack:
    api = client.CustomObjectsApi(cluster.api)
    wait_for(lambda: _ready(api.get_cluster_custom_object("opensds.io", "v1alpha1", "storagebackends",
                                                          processes.backend)), 60, "backend Ready")
    backend_dir = processes.logs / "backend"
    return Stack(processes.backend, backend_dir)


def _ready(obj: dict[str, object]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions", [])  # type: ignore[attr-defined]
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except ApiException as e:
            if e.status != 404:
                raise
            last = None
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
