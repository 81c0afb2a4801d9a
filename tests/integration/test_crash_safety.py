"""SIGKILL the operator and the dock at random points during 50 concurrent creates and deletes:
after a restart nothing leaks on the backend and nothing stays in a transitional phase."""
from __future__ import annotations

import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from kubernetes import client

from opensds_operator.drivers.base import Owner
from opensds_operator.drivers.file import FileDriver

from .conftest import Cluster, Processes, Stack, wait_for
from .helpers import CRs, events_for

COUNT = 50


def _chaos(processes: Processes, stop: threading.Event, rng: random.Random, kills: list[str]) -> None:
    while not stop.is_set():
        time.sleep(rng.uniform(0.3, 1.5))
        victim = rng.choice(["operator", "dock"])
        processes.kill(victim)
        kills.append(victim)
        time.sleep(rng.uniform(0.0, 0.8))
        processes.start(victim)


def test_random_sigkills_during_concurrent_creates_and_deletes_leak_nothing(
        cluster: Cluster, stack: Stack, processes: Processes, namespace: str) -> None:
    seed = int(os.environ.get("OPENSDS_CHAOS_SEED", time.time()))
    rng = random.Random(seed)
    crs = CRs(cluster.api, namespace)
    profile = f"chaos-{uuid.uuid4().hex[:6]}"
    crs.create("storageprofiles", "StorageProfile", profile, {"storageType": "block", "accessProtocol": "local"})
    names = [f"v{i:02d}" for i in range(COUNT)]
    doomed = set(rng.sample(names, COUNT // 2))
    uids: dict[str, str] = {}
    stop, kills = threading.Event(), []
    chaos = threading.Thread(target=_chaos, args=(processes, stop, rng, kills), daemon=True)

    def lifecycle(name: str) -> None:
        vol = crs.create("volumes", "Volume", name, {"size": f"{rng.randint(1, 64)}Mi", "profile": profile})
        uids[name] = vol["metadata"]["uid"]
        if name in doomed:
            time.sleep(rng.uniform(0, 3))
            crs.delete("volumes", name)

    chaos.start()
    try:
        with ThreadPoolExecutor(max_workers=10) as pool:
            list(pool.map(lifecycle, names))
        time.sleep(4)  # let the chaos run on while the backend work is in flight
    finally:
        stop.set()
        chaos.join()
    for which in ("operator", "dock"):
        if which not in processes.procs:
            processes.start(which)

    survivors = sorted(set(names) - doomed)

    def settled() -> bool:
        vols = crs.api.list_namespaced_custom_object("opensds.io", "v1alpha1", namespace, "volumes")["items"]
        present = {v["metadata"]["name"]: (v.get("status") or {}).get("phase") for v in vols}
        return sorted(present) == survivors and all(p == "Available" for p in present.values())

    wait_for(settled, 180, f"survivors Available and doomed volumes gone (seed {seed}, kills {kills})", 1.0)
    files = sorted(p.name for p in (stack.backend_dir / "volumes").iterdir())
    expected = sorted(f"vol-{uids[n]}.img" for n in survivors)
    assert files == expected, f"leaked or missing backing files (seed {seed}, kills {kills})"
    assert len(kills) >= 3, f"chaos too gentle to prove anything: {kills}"
    print(f"chaos seed {seed}: {len(kills)} SIGKILLs ({kills}), {len(survivors)} survivors, 0 leaked files")

    for name in survivors:
        crs.delete("volumes", name)
    wait_for(lambda: not crs.api.list_namespaced_custom_object(
        "opensds.io", "v1alpha1", namespace, "volumes")["items"], 120, "all volumes deleted", 1.0)
    assert list((stack.backend_dir / "volumes").iterdir()) == []
    crs.delete("storageprofiles", profile)


def _cluster_id(cluster: Cluster) -> str:
    return str(client.CoreV1Api(cluster.api).read_namespace("kube-system").metadata.uid)


def test_dock_restart_quarantines_only_its_own_orphans_and_keeps_retained_volumes(
        cluster: Cluster, stack: Stack, processes: Processes, namespace: str) -> None:
    """The sweep touches only objects tagged with this cluster and backend; it renames them aside
    first and purges them after the quarantine; a Retain record lives on the object itself."""
    crs = CRs(cluster.api, namespace)
    profile = f"gc-{uuid.uuid4().hex[:6]}"
    crs.create("storageprofiles", "StorageProfile", profile, {"storageType": "block", "accessProtocol": "local"})
    kept = crs.create("volumes", "Volume", "kept", {"size": "1Mi", "profile": profile, "reclaimPolicy": "Retain"})
    wait_for(lambda: (crs.get("volumes", "kept").get("status") or {}).get("phase") == "Available", 60, "Available")
    crs.delete("volumes", "kept")
    wait_for(lambda: not crs.exists("volumes", "kept"), 60, "retained Volume CR deleted")
    kept_id = f"vol-{kept['metadata']['uid']}"

    # Three strays as a crash, another cluster and a hand-made file would leave them.
    driver = FileDriver(str(stack.backend_dir))
    ours, theirs, untagged = (f"vol-{uuid.uuid4()}" for _ in range(3))
    driver.create_volume(ours, "default", 1 << 20, True,
                         owner=Owner(_cluster_id(cluster), stack.backend, "Volume", namespace, "lost", ours[4:]))
    driver.create_volume(theirs, "default", 1 << 20, True,
                         owner=Owner(str(uuid.uuid4()), stack.backend, "Volume", namespace, "x", theirs[4:]))
    driver.create_volume(untagged, "default", 1 << 20, True)

    processes.kill("dock")
    processes.dock_args = ["--quarantine-hours", "0.002", "--orphan-interval", "3"]
    try:
        processes.start("dock")
        wait_for(lambda: ours not in driver.list_objects("default"), 60, "our orphan quarantined")
        assert any(o.backend_id == ours and o.quarantined_at for o in driver.scan("default")), "not kept aside"
        # The backend is cluster-scoped: its Events land in "default".
        assert any(e.startswith("OrphanQuarantined") and ours in e
                   for e in events_for(cluster.api, "default", stack.backend))
        wait_for(lambda: all(o.backend_id != ours for o in driver.scan("default")), 60, "quarantine purged")
        time.sleep(4)  # one more sweep
        left = set(driver.list_objects("default"))
        assert {kept_id, theirs, untagged} <= left, "the sweep touched what it cannot prove is its garbage"
        status = crs.get("storagebackends", stack.backend)["status"]
        assert status["foreignObjects"] >= 2
    finally:
        processes.kill("dock")
        processes.dock_args = []
        processes.start("dock")
    for backend_id in (kept_id, theirs, untagged):
        driver.delete_volume(backend_id, "default")
    crs.delete("storageprofiles", profile)
