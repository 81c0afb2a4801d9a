"""Long chaos run (`make chaos`, not part of `make test`): CSI create/publish/unpublish/delete
operations while the operator, the dock and the CSI controller are SIGKILLed every ~10 s and the
kube-apiserver is restarted once. Afterwards: 0 leaked or quarantined backend objects, nothing
stuck 60 s after the last restart, and every surviving volume holds exactly the bytes written
to it (sha256). Seed printed; replay with OPENSDS_CHAOS_SEED, size with OPENSDS_CHAOS_OPS.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import urllib3
from kubernetes import client

from opensds_csi.proto import csi_pb2, csi_pb2_grpc
from opensds_operator.drivers.file import FileDriver

from .conftest import (
    CLUSTER_DIR,
    CLUSTER_SH,
    NODE,
    NODE_KEY,
    ROOT,
    Cluster,
    CsiPlugin,
    Processes,
    Stack,
    _spawn,
    wait_for,
    wait_for_socket,
)

pytestmark = pytest.mark.chaos

OPS = int(os.environ.get("OPENSDS_CHAOS_OPS", "300"))
NAMESPACE = "opensds-system"  # where the CSI controller keeps its Volume CRs
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
T = TypeVar("T")


class Controller:
    """A CSI controller process of our own that the chaos thread can kill and restart."""

    def __init__(self, plugin: CsiPlugin, workdir: Path) -> None:
        self.plugin, self.workdir = plugin, workdir
        self.socket = workdir / "chaos-controller.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        venv_bin = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
        self.proc = _spawn([str(venv_bin / "opensds-csi"), "--role", "controller", "--namespace", NAMESPACE,
                            "--endpoint", f"unix://{self.socket}"], self.workdir / "chaos-controller.log",
                           self.plugin.kubeconfig)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def call(fn: Callable[[], T], what: str, deadline_s: float = 180) -> T:
    """Retry a CSI call the way a sidecar does: the same idempotent request until it answers."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or time.monotonic() > deadline:  # type: ignore[attr-defined]
                raise AssertionError(f"{what}: {e.code()} {e.details()}") from e  # type: ignore[attr-defined]
            time.sleep(0.5)


def restart_apiserver() -> None:
    """SIGKILL the kube-apiserver and start it again with hack/cluster.sh."""
    pid_file = CLUSTER_DIR / "run" / "kube-apiserver.pid"
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    # Its parent shell is gone, and not every init reaps at once: a zombie still answers
    # `kill -0`, which would make cluster.sh think it is running. Wait for it to die, then
    # drop the pid file.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                break
        except (FileNotFoundError, IndexError):
            break
        time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    subprocess.run(["bash", str(CLUSTER_SH), "up"], check=True, capture_output=True)


@pytest.fixture
def controller(csi_plugin: CsiPlugin, tmp_path: Path) -> Iterator[Controller]:
    c = Controller(csi_plugin, tmp_path)
    c.start()
    assert c.proc is not None
    wait_for_socket(c.socket, c.proc)
    yield c
    c.kill()


def test_chaos_kills_and_an_apiserver_restart_leak_nothing_and_change_no_data(
        cluster: Cluster, stack: Stack, processes: Processes, controller: Controller, csi_plugin: CsiPlugin) -> None:
    seed = int(os.environ.get("OPENSDS_CHAOS_SEED", time.time()))
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:5]
    custom = client.CustomObjectsApi(cluster.api)
    ops, kills, lock = [0], [], threading.Lock()
    checksums: dict[str, str] = {}
    survivors: set[str] = set()
    stop, apiserver_restarted = threading.Event(), threading.Event()
    last_restart = [time.monotonic()]

    def stub() -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(grpc.insecure_channel(f"unix://{controller.socket}"))

    def counted(fn: Callable[[], T], what: str) -> T:
        result = call(fn, what)
        with lock:
            ops[0] += 1
        # Paced like a busy cluster, so the run spans many kills (an idle one does 300 in seconds).
        time.sleep(rng.uniform(0.5, 2.0))
        return result

    def read_volume(name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = custom.get_namespaced_custom_object("opensds.io", "v1alpha1", NAMESPACE,
                                                                         "volumes", name)
            return found
        except urllib3.exceptions.HTTPError:  # the apiserver is being restarted: ask again
            return None

    def backing_file(name: str) -> Path:
        vol = wait_for(lambda: read_volume(name), 120, f"Volume {name}")
        return stack.backend_dir / "volumes" / f"vol-{vol['metadata']['uid']}.img"  # type: ignore[index]

    def lifecycle(i: int) -> None:
        name = f"chaos-{run}-{i:03d}"
        capability = csi_pb2.VolumeCapability(
            block=csi_pb2.VolumeCapability.BlockVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
        size = rng.randint(4, 16) << 20  # once: a retry must repeat the same request
        delete = rng.random() < 0.5
        created = counted(lambda: stub().CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[capability], parameters={"profile": csi_plugin.profile},
            accessibility_requirements=csi_pb2.TopologyRequirement(
                preferred=[csi_pb2.Topology(segments={NODE_KEY: NODE})])), timeout=60), f"create {name}")
        volume_id = created.volume.volume_id
        path = backing_file(volume_id.split("/")[1])
        data = os.urandom(64 << 10)
        with open(path, "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        counted(lambda: stub().ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=NODE, volume_capability=capability), timeout=60), f"publish {name}")
        counted(lambda: stub().ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=volume_id, node_id=NODE), timeout=60), f"unpublish {name}")
        if delete:
            counted(lambda: stub().DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=60),
                    f"delete {name}")
        else:
            with lock:
                checksums[volume_id] = digest
                survivors.add(path.name)

    chaos_errors: list[BaseException] = []

    def chaos() -> None:
        try:
            run_chaos()
        except BaseException as e:  # surfaced by the test below, not lost with the thread
            chaos_errors.append(e)
            raise

    def run_chaos() -> None:
        victims = ["operator", "dock", "controller"]
        while not stop.wait(rng.uniform(8, 12)):
            if not apiserver_restarted.is_set() and ops[0] >= OPS // 3:
                restart_apiserver()
                apiserver_restarted.set()
                kills.append("kube-apiserver")
            victim = rng.choice(victims)
            if victim == "controller":
                controller.kill()
            else:
                processes.kill(victim)
            kills.append(victim)
            time.sleep(rng.uniform(0.5, 2.0))
            controller.start() if victim == "controller" else processes.start(victim)
            last_restart[0] = time.monotonic()

    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lifecycle, range((OPS + 2) // 3)))
    finally:
        stop.set()
        chaos_thread.join()
    assert not chaos_errors, f"the chaos thread failed: {chaos_errors[0]!r}"
    for which in ("operator", "dock"):
        if which not in processes.procs:
            processes.start(which)
    if controller.proc is None or controller.proc.poll() is not None:
        controller.start()
    settle_start = time.monotonic()

    def settled() -> bool:
        vols = custom.list_namespaced_custom_object("opensds.io", "v1alpha1", NAMESPACE, "volumes")["items"]
        mine = {v["metadata"]["name"]: (v.get("status") or {}).get("phase") for v in vols
                if v["metadata"]["name"].startswith(f"chaos-{run}-")}
        return len(mine) == len(checksums) and all(p == "Available" for p in mine.values())

    wait_for(settled, 60, f"nothing stuck 60 s after the last restart (seed {seed}, kills {kills})", 1.0)
    settle_seconds = time.monotonic() - settle_start
    driver = FileDriver(str(stack.backend_dir))
    present = {o.backend_id + ".img" for o in driver.scan("default") if o.quarantined_at is None}
    quarantined = [o.backend_id for o in driver.scan("default") if o.quarantined_at is not None]
    leaked = sorted(present - survivors - _other_live_files(custom))
    assert not leaked, f"leaked backing files (seed {seed}, kills {kills}): {leaked}"
    assert not quarantined, f"objects needed quarantine (seed {seed}): {quarantined}"
    changed = [vid for vid, digest in checksums.items()
               if hashlib.sha256(backing_file(vid.split("/")[1]).read_bytes()).hexdigest() != digest]
    assert not changed, f"volume contents changed (seed {seed}): {changed}"
    assert apiserver_restarted.is_set() and len(kills) >= 3, f"chaos too gentle: {kills}"
    print(f"chaos seed {seed}: {ops[0]} CSI operations, {len(kills)} kills ({kills}), {len(checksums)} survivors "
          f"with unchanged sha256, 0 leaked, 0 quarantined, everything settled {settle_seconds:.1f} s after the "
          f"chaos stopped")

    for volume_id in checksums:
        call(lambda v=volume_id: csi_pb2_grpc.ControllerStub(grpc.insecure_channel(
            f"unix://{controller.socket}")).DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v), timeout=60),
            f"cleanup {volume_id}")


def _other_live_files(custom: client.CustomObjectsApi) -> set[str]:
    """Backing files of Volumes and Snapshots other tests still own (not ours to judge)."""
    found = set()
    for plural, prefix in (("volumes", "vol"), ("snapshots", "snap")):
        items: list[dict[str, Any]] = custom.list_cluster_custom_object("opensds.io", "v1alpha1", plural)["items"]
        found |= {f"{prefix}-{o['metadata']['uid']}.img" for o in items}
    return found
