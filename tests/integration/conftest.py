"""Integration fixtures: a real kube-apiserver (hack/cluster.sh) with our CRDs installed.

The control plane is the tests' own (tests/testenv.py: .cluster-test/, apiserver 26443, etcd
25790 by default), never `make up`'s. It is session-scoped: started when absent (and stopped
again at the end unless OPENSDS_KEEP_CLUSTER=1), reused when a developer already runs it. Each
test gets its own namespace, deleted afterwards. One session at a time holds the cluster (a
lock file); at its start, what an interrupted earlier session left behind (its processes, the
objects labelled testenv.TEST_LABEL, and the Volumes/PVs hanging off them) is removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from opensds_operator.api import PROFILE_LABEL

from .. import testenv

ROOT = testenv.ROOT
CLUSTER_SH = ROOT / "hack" / "cluster.sh"
CEPH_SH = ROOT / "hack" / "ceph.sh"
CLUSTER_DIR = testenv.CLUSTER_DIR
KUBECONFIG = testenv.KUBECONFIG
KUBECTL = ROOT / "bin" / "kubectl"
CEPH_DIR = testenv.CEPH_DIR
PIDS_DIR = CLUSTER_DIR / "test-pids"        # processes a session started (killed by the next if left)
SESSION_MARK = CLUSTER_DIR / "test-session"  # present while a session runs (left by an interrupted one)
LABELS = testenv.LABELS


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


def _session_lock() -> IO[str]:
    """One test session per test cluster: a second one would delete the first's objects."""
    CLUSTER_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = open(CLUSTER_DIR / "test-session.lock", "a+")  # noqa: SIM115 (held all session)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        pytest.exit(f"another test session is using {CLUSTER_DIR} (lock {lock.name}); wait for it, "
                    f"or give this one its own: OPENSDS_TEST_CLUSTER_DIR, OPENSDS_TEST_*_PORT", returncode=3)
    return lock


def _start_time(pid: int) -> str | None:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError):
        return None


def track(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Record a process this session started, so a later session can end it if this one is killed."""
    PIDS_DIR.mkdir(parents=True, exist_ok=True)
    (PIDS_DIR / f"{proc.pid}.pid").write_text(f"{proc.pid} {_start_time(proc.pid)}\n")
    return proc


def _kill_leftover_processes() -> list[str]:
    """SIGKILL what an interrupted earlier session started (and only that: pid and start time
    recorded by track(); never a pattern that could match `make up`'s processes in .run/)."""
    killed = []
    for pid_file in sorted(PIDS_DIR.glob("*.pid")) if PIDS_DIR.is_dir() else []:
        with contextlib.suppress(ValueError, OSError):
            pid_text, started = pid_file.read_text().split()
            pid = int(pid_text)
            if _start_time(pid) == started:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                os.killpg(pid, signal.SIGKILL)  # spawned with a session of its own
                killed.append(f"{pid} {command}")
        pid_file.unlink(missing_ok=True)
    return killed


def _forget_finished_processes() -> None:
    for pid_file in PIDS_DIR.glob("*.pid") if PIDS_DIR.is_dir() else []:
        with contextlib.suppress(ValueError, OSError):
            pid_text, started = pid_file.read_text().split()
            if _start_time(int(pid_text)) != started:
                pid_file.unlink(missing_ok=True)


def _force_delete(delete: Callable[[], object], strip: Callable[[], object]) -> None:
    """Delete an object whose controller may be gone: delete, then drop its finalizers."""
    for call in (delete, strip):
        try:
            call()
        except ApiException as e:
            if e.status != 404:
                raise


NO_FINALIZERS = {"metadata": {"finalizers": None}}


def remove_leftovers(api: client.ApiClient) -> list[str]:
    """Remove what earlier test sessions left in the test cluster: objects labelled as test-made,
    the StorageClasses/VolumeSnapshotClasses made for their profiles, and the Volumes, Snapshots,
    PVs and VolumeSnapshotContents that belong to them. Finalizers are dropped (the operator and
    docks that would release them are gone with that session). Returns what was removed."""
    core, storage = client.CoreV1Api(api), client.StorageV1Api(api)
    custom = client.CustomObjectsApi(api)
    selector = f"{testenv.TEST_LABEL}={testenv.TEST_LABEL_VALUE}"
    removed: list[str] = []
    namespaces = {n.metadata.name for n in core.list_namespace(label_selector=selector).items}
    backends = {o["metadata"]["name"] for o in custom.list_cluster_custom_object(
        "opensds.io", "v1alpha1", "storagebackends", label_selector=selector)["items"]}
    profiles = {o["metadata"]["name"] for o in custom.list_cluster_custom_object(
        "opensds.io", "v1alpha1", "storageprofiles", label_selector=selector)["items"]}
    if not (namespaces or backends or profiles):
        leftovers_elsewhere = (core.list_node(label_selector=selector).items
                               or storage.list_csi_node(label_selector=selector).items
                               or storage.list_storage_class(label_selector=selector).items)
        if not leftovers_elsewhere:
            return removed

    # Volumes and Snapshots of those namespaces, backends or profiles (the CSI controller makes its
    # Volumes in opensds-system, so namespace alone does not find them).
    for plural in ("snapshots", "volumes"):
        for obj in custom.list_cluster_custom_object("opensds.io", "v1alpha1", plural)["items"]:
            meta, spec = obj["metadata"], obj.get("spec") or {}
            if meta["namespace"] in namespaces or spec.get("backend") in backends or spec.get("profile") in profiles:
                ns, name = meta["namespace"], meta["name"]
                _force_delete(
                    lambda p=plural, n=ns, m=name: custom.delete_namespaced_custom_object(  # type: ignore[misc]
                        "opensds.io", "v1alpha1", n, p, m),
                    lambda p=plural, n=ns, m=name: custom.patch_namespaced_custom_object(  # type: ignore[misc]
                        "opensds.io", "v1alpha1", n, p, m, NO_FINALIZERS))
                removed.append(f"{plural}/{ns}/{name}")
    # PVs and VolumeSnapshotContents whose claims lived in those namespaces.
    for pv in core.list_persistent_volume().items:
        claim = pv.spec.claim_ref
        if claim is not None and claim.namespace in namespaces:
            name = pv.metadata.name
            _force_delete(lambda n=name: core.delete_persistent_volume(n),  # type: ignore[misc]
                          lambda n=name: core.patch_persistent_volume(n, NO_FINALIZERS))  # type: ignore[misc]
            removed.append(f"persistentvolumes/{name}")
    snap = ("snapshot.storage.k8s.io", "v1")
    for content in custom.list_cluster_custom_object(*snap, "volumesnapshotcontents")["items"]:
        if (content.get("spec", {}).get("volumeSnapshotRef") or {}).get("namespace") in namespaces:
            name = content["metadata"]["name"]
            _force_delete(lambda n=name: custom.delete_cluster_custom_object(  # type: ignore[misc]
                              *snap, "volumesnapshotcontents", n),
                          lambda n=name: custom.patch_cluster_custom_object(  # type: ignore[misc]
                              *snap, "volumesnapshotcontents", n, NO_FINALIZERS))
            removed.append(f"volumesnapshotcontents/{name}")
    # Namespaced objects with finalizers in the namespaces (PVCs, VolumeSnapshots), then the namespaces.
    for ns in sorted(namespaces):
        for pvc in core.list_namespaced_persistent_volume_claim(ns).items:
            with contextlib.suppress(ApiException):
                core.patch_namespaced_persistent_volume_claim(pvc.metadata.name, ns, NO_FINALIZERS)
        for vs in custom.list_namespaced_custom_object(*snap, ns, "volumesnapshots")["items"]:
            with contextlib.suppress(ApiException):
                custom.patch_namespaced_custom_object(*snap, ns, "volumesnapshots", vs["metadata"]["name"],
                                                      NO_FINALIZERS)
        _force_delete(lambda n=ns: core.delete_namespace(n), lambda: None)  # type: ignore[misc]
        removed.append(f"namespaces/{ns}")
    # Cluster-scoped test objects, and the classes the operator made for leftover profiles.
    for plural, names in (("storagebackends", backends), ("storageprofiles", profiles)):
        for name in sorted(names):
            _force_delete(
                lambda p=plural, n=name: custom.delete_cluster_custom_object(  # type: ignore[misc]
                    "opensds.io", "v1alpha1", p, n),
                lambda p=plural, n=name: custom.patch_cluster_custom_object(  # type: ignore[misc]
                    "opensds.io", "v1alpha1", p, n, NO_FINALIZERS))
            removed.append(f"{plural}/{name}")
    for sc in storage.list_storage_class().items:
        labels = sc.metadata.labels or {}
        if labels.get(testenv.TEST_LABEL) == testenv.TEST_LABEL_VALUE or labels.get(PROFILE_LABEL) in profiles:
            _force_delete(lambda n=sc.metadata.name: storage.delete_storage_class(n), lambda: None)  # type: ignore[misc]
            removed.append(f"storageclasses/{sc.metadata.name}")
    for vsc in custom.list_cluster_custom_object(*snap, "volumesnapshotclasses")["items"]:
        labels = vsc["metadata"].get("labels") or {}
        if labels.get(testenv.TEST_LABEL) == testenv.TEST_LABEL_VALUE or labels.get(PROFILE_LABEL) in profiles:
            name = vsc["metadata"]["name"]
            _force_delete(lambda n=name: custom.delete_cluster_custom_object(  # type: ignore[misc]
                *snap, "volumesnapshotclasses", n), lambda: None)
            removed.append(f"volumesnapshotclasses/{name}")
    for csinode in storage.list_csi_node(label_selector=selector).items:
        _force_delete(lambda n=csinode.metadata.name: storage.delete_csi_node(n), lambda: None)  # type: ignore[misc]
        removed.append(f"csinodes/{csinode.metadata.name}")
    for node in core.list_node(label_selector=selector).items:
        _force_delete(lambda n=node.metadata.name: core.delete_node(n), lambda: None)  # type: ignore[misc]
        removed.append(f"nodes/{node.metadata.name}")
    return removed


@pytest.fixture
def loop_devices() -> None:
    testenv.require_root_and_loop_devices()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    lock = _session_lock()
    killed = _kill_leftover_processes()
    interrupted = SESSION_MARK.exists()  # an earlier session never reached its end
    running = subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True).returncode == 0
    if not running:
        subprocess.run(["bash", str(CLUSTER_SH), "up"], check=True)
    SESSION_MARK.write_text(f"{os.getpid()}\n")
    api = config.new_client_from_config(config_file=str(KUBECONFIG))
    c = Cluster(kubeconfig=KUBECONFIG, api=api)
    crd_dirs = [ROOT / "crds", ROOT / "bin" / "snapshot-crds"]
    c.kubectl("apply", "--server-side", "--force-conflicts", *[f"-f={d}" for d in crd_dirs])
    names = [
        f"{p}.opensds.io" for p in ("storagebackends", "storageprofiles", "volumes", "snapshots")
    ] + [f"volumesnapshot{s}.snapshot.storage.k8s.io" for s in ("s", "classes", "contents")]
    _wait_established(c, names)
    removed = remove_leftovers(api)
    if killed or removed:
        print(f"\nremoved what an earlier test session left in {CLUSTER_DIR.name}: processes {killed}, "
              f"objects {removed}")
    yield c
    api.close()
    _forget_finished_processes()
    # A cluster an interrupted session left running is ours to stop too.
    if (not running or interrupted) and os.environ.get("OPENSDS_KEEP_CLUSTER") != "1":
        subprocess.run(["bash", str(CLUSTER_SH), "down"], check=True)
    SESSION_MARK.unlink(missing_ok=True)
    lock.close()


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[Path]:
    """The tests' own single-node Ceph (hack/ceph.sh on testenv.CEPH_DIR/CEPH_PORT), started when
    absent and stopped at the end unless OPENSDS_KEEP_CLUSTER=1. Ceph comes from hack/deps.sh's
    packages; without it hack/ceph.sh fails saying what is missing (no skip)."""
    running = subprocess.run(["bash", str(CEPH_SH), "status"], capture_output=True).returncode == 0
    if not running:
        subprocess.run(["bash", str(CEPH_SH), "up"], check=True)
    yield CEPH_DIR
    if not running and os.environ.get("OPENSDS_KEEP_CLUSTER") != "1":
        subprocess.run(["bash", str(CEPH_SH), "down"], check=True)


def ceph_client_key(ceph_dir: Path) -> str:
    return next(line.split("=", 1)[1].strip() for line in (ceph_dir / "client.opensds.keyring").read_text().splitlines()
                if line.strip().startswith("key"))


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of the test's own, deleted (without waiting) when the test ends."""
    short = request.node.name.lower().replace("_", "-")[:40].strip("-")
    name = f"t-{short}-{uuid.uuid4().hex[:5]}"
    core = client.CoreV1Api(cluster.api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=LABELS)))
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
        return track(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))


class Processes:
    """Starts, kills and restarts the operator and dock (the crash tests need all three)."""

    def __init__(self, backend: str, logs: Path, kubeconfigs: dict[str, Path]) -> None:
        self.backend, self.logs, self.kubeconfigs = backend, logs, kubeconfigs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.dock_args: list[str] = []  # extra flags for the next dock start (e.g. a short quarantine)

    def start(self, which: str) -> None:
        venv_bin = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
        if which == "operator":
            args = [str(venv_bin / "opensds-operator")]
        else:
            args = [str(venv_bin / "opensds-dock"), "--backend", self.backend, "--capacity-interval", "5",
                    *self.dock_args]
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
        "apiVersion": "opensds.io/v1alpha1", "kind": "StorageBackend", "metadata": {"name": backend, "labels": LABELS},
        "spec": {"driver": "file", "nodeName": "node-1", "topology": {"topology.opensds.io/zone": "z1"},
                 "parameters": {"path": str(base / "backend"), "capacity": "8Gi"}},
    })
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "manifests/base/namespace.yaml"))
    for rbac in ("rbac-operator.yaml", "rbac-dock.yaml", "admission-dock.yaml"):
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


# ---------------------------------------------------------------- CSI plugin

NODE = "node-1"  # the file backend's spec.nodeName, and the node the CSI node plugin serves
ZONE_KEY, ZONE = "topology.opensds.io/zone", "z1"
NODE_KEY = "topology.block.csi.opensds.io/node"
CSI_DRIVER = "block.csi.opensds.io"


@dataclass(frozen=True)
class CsiPlugin:
    controller_endpoint: str
    node_endpoint: str
    profile: str
    dir: Path
    kubeconfig: Path  # the CSI controller ServiceAccount's


def register_node(cluster: Cluster, node: str) -> None:
    """What kubelet and node-driver-registrar would write: a Node with topology labels and its CSINode."""
    core, storage = client.CoreV1Api(cluster.api), client.StorageV1Api(cluster.api)
    labels = {NODE_KEY: node, ZONE_KEY: ZONE, "kubernetes.io/hostname": node, **LABELS}
    try:
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node, labels=labels)))
    except ApiException as e:
        if e.status != 409:
            raise
        core.patch_node(node, {"metadata": {"labels": labels}})
    csinode = client.V1CSINode(
        metadata=client.V1ObjectMeta(name=node, labels=LABELS),
        spec=client.V1CSINodeSpec(drivers=[client.V1CSINodeDriver(
            name=CSI_DRIVER, node_id=node, topology_keys=[NODE_KEY, ZONE_KEY])]))
    try:
        storage.create_csi_node(csinode)
    except ApiException as e:
        if e.status != 409:
            raise


def unregister_node(cluster: Cluster, node: str) -> None:
    """Delete what register_node wrote (only when it carries the test label)."""
    core, storage = client.CoreV1Api(cluster.api), client.StorageV1Api(cluster.api)
    for read, delete in ((storage.read_csi_node, storage.delete_csi_node), (core.read_node, core.delete_node)):
        try:
            if (read(node).metadata.labels or {}).get(testenv.TEST_LABEL) == testenv.TEST_LABEL_VALUE:
                delete(node)
        except ApiException as e:
            if e.status != 404:
                raise


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def csi_plugin(stack: Stack, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CsiPlugin]:
    """Our CSI controller (under the shipped ServiceAccount) and node plugin, serving node-1."""
    base = tmp_path_factory.mktemp("csi")
    cluster.kubectl("apply", "--server-side", "-n", "opensds-system", "-f",
                    str(ROOT / "manifests/base/rbac-csi-controller.yaml"))
    kubeconfig = service_account_kubeconfig(cluster, "opensds-csi-controller", base / "controller.kubeconfig")
    register_node(cluster, NODE)
    profile = "csi-local"
    api = client.CustomObjectsApi(cluster.api)
    if not _exists(api, "storageprofiles", profile):
        api.create_cluster_custom_object("opensds.io", "v1alpha1", "storageprofiles", {
            "apiVersion": "opensds.io/v1alpha1", "kind": "StorageProfile",
            "metadata": {"name": profile, "labels": LABELS},
            "spec": {"storageType": "block", "accessProtocol": "local", "fsType": "xfs",
                     "provisioning": {"type": "thin"}}})
    venv_bin = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
    verbose = ["--verbose"] if os.environ.get("OPENSDS_TEST_VERBOSE") == "1" else []
    controller = _spawn([str(venv_bin / "opensds-csi"), "--role", "controller", "--namespace", "opensds-system",
                         "--endpoint", f"unix://{base}/controller.sock", *verbose],
                        base / "csi-controller.log", kubeconfig)
    node = _spawn([str(venv_bin / "opensds-csi"), "--role", "node", "--node-id", NODE,
                   "--topology", f"{ZONE_KEY}={ZONE}", "--state-dir", str(base / "node-state"),
                   "--local-root", str(stack.backend_dir), "--endpoint", f"unix://{base}/node.sock", *verbose],
                  base / "csi-node.log", kubeconfig)
    try:
        wait_for_socket(base / "controller.sock", controller)
        wait_for_socket(base / "node.sock", node)
        yield CsiPlugin(f"unix://{base}/controller.sock", f"unix://{base}/node.sock", profile, base, kubeconfig)
    finally:
        for proc in (controller, node):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"CSI plugin logs in {base}")
        # Leave nothing behind: the profile (its StorageClass/VolumeSnapshotClass go with it; the
        # session's operator is still running and releases it), then the Node and CSINode.
        with contextlib.suppress(ApiException):
            api.delete_cluster_custom_object("opensds.io", "v1alpha1", "storageprofiles", profile)
        wait_for(lambda: not _exists(api, "storageprofiles", profile), 60, f"StorageProfile {profile} deleted")
        unregister_node(cluster, NODE)


@dataclass(frozen=True)
class Sidecars:
    plugin: CsiPlugin
    logs: Path


def sidecar_args() -> dict[str, list[str]]:
    """hack/sidecars.txt: the sidecar flags shared with hack/up.sh."""
    lines = (ROOT / "hack" / "sidecars.txt").read_text().splitlines()
    return {name: flags.split() for name, _, flags in (line.partition(":") for line in lines)
            if name and not name.startswith("#")}


@pytest.fixture(scope="session")
def sidecars(csi_plugin: CsiPlugin, cluster: Cluster) -> Iterator[Sidecars]:
    """The real external-provisioner, -attacher, -resizer and csi-snapshotter on our controller socket
    (running as the shipped CSI controller ServiceAccount), plus the cluster's snapshot-controller."""
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "manifests/base/csidriver.yaml"))
    env = {**os.environ, "NAMESPACE": "opensds-system", "POD_NAME": "opensds-csi-controller"}
    address = csi_plugin.controller_endpoint.removeprefix("unix://")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, extra in sidecar_args().items():
            with open(csi_plugin.dir / f"{name}.log", "ab") as log:
                procs.append(track(subprocess.Popen(
                    [str(ROOT / "bin" / name), f"--csi-address={address}", f"--kubeconfig={csi_plugin.kubeconfig}",
                     "--v=3", *extra], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)))
        with open(csi_plugin.dir / "snapshot-controller.log", "ab") as log:
            procs.append(track(subprocess.Popen(
                [str(ROOT / "bin" / "snapshot-controller"), f"--kubeconfig={KUBECONFIG}", "--v=3"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)))
        yield Sidecars(csi_plugin, csi_plugin.dir)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
