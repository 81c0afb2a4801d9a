"""Data safety with the real operator and dock on the file backend (issue 9, items 1, 5, 8, 12)."""
from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from opensds_operator.leader import BackendLease

from .conftest import ROOT, Cluster, Processes, Stack, _spawn, wait_for
from .helpers import CRs, condition, events_for


@pytest.fixture
def profile(cluster: Cluster) -> Iterator[str]:
    crs = CRs(cluster.api)
    name = f"safe-{uuid.uuid4().hex[:6]}"
    crs.create("storageprofiles", "StorageProfile", name, {"storageType": "block", "accessProtocol": "local"})
    yield name
    crs.delete_if_present("storageprofiles", name)


def _available(crs: CRs, name: str) -> bool:
    return (crs.get("volumes", name).get("status") or {}).get("phase") == "Available"


def test_dock_restarted_while_a_volume_file_is_missing_reports_it_and_never_makes_a_blank_one(
        cluster: Cluster, stack: Stack, processes: Processes, namespace: str, profile: str) -> None:
    crs = CRs(cluster.api, namespace)
    vol = crs.create("volumes", "Volume", "data", {"size": "4Mi", "profile": profile})
    wait_for(lambda: _available(crs, "data"), 60, "Available")
    image = stack.backend_dir / "volumes" / f"vol-{vol['metadata']['uid']}.img"
    image.write_bytes(b"precious" * 1000)
    aside = image.with_name("unmounted-disk.img")
    image.rename(aside)  # as if the backend's disk were not mounted when the dock starts

    processes.kill("dock")
    processes.start("dock")
    ready = wait_for(lambda: (c := condition(crs.get("volumes", "data"), "Ready")) and c["reason"] ==
                     "BackendObjectMissing" and c, 60, "BackendObjectMissing")
    assert "not re-created" in ready["message"]  # type: ignore[index]
    assert crs.get("volumes", "data")["status"]["code"] == "BackendObjectMissing"
    assert not image.exists(), "the dock made a blank volume in place of the missing one"
    wait_for(lambda: any(e.startswith("BackendObjectMissing") for e in events_for(cluster.api, namespace, "data")),
             10, "a BackendObjectMissing Event")

    aside.rename(image)  # the disk is back
    processes.kill("dock")
    processes.start("dock")
    wait_for(lambda: _available(crs, "data"), 60, "Available again")
    assert image.read_bytes().startswith(b"precious")
    crs.delete("volumes", "data")
    wait_for(lambda: not crs.exists("volumes", "data"), 60, "deleted")


def test_pinned_placement_is_checked_by_the_scheduler_before_the_dock_acts(
        cluster: Cluster, stack: Stack, namespace: str, profile: str) -> None:
    crs = CRs(cluster.api, namespace)
    vol = crs.create("volumes", "Volume", "pinned", {"size": "64Gi", "profile": profile,
                                                      "backend": stack.backend, "pool": "default"})
    scheduled = wait_for(lambda: (c := condition(crs.get("volumes", "pinned"), "Scheduled")) and
                         c["status"] == "False" and c, 60, "Scheduled=False")
    assert scheduled["reason"] == "PlacementInvalid"  # type: ignore[index]
    assert "pinned placement" in scheduled["message"]  # type: ignore[index]
    time.sleep(3)
    assert not (stack.backend_dir / "volumes" / f"vol-{vol['metadata']['uid']}.img").exists()
    crs.delete("volumes", "pinned")
    wait_for(lambda: not crs.exists("volumes", "pinned"), 60, "deleted")

    ok = crs.create("volumes", "Volume", "pinned-ok", {"size": "4Mi", "profile": profile,
                                                        "backend": stack.backend, "pool": "default"})
    wait_for(lambda: _available(crs, "pinned-ok"), 60, "a valid pinned placement becomes Available")
    assert (stack.backend_dir / "volumes" / f"vol-{ok['metadata']['uid']}.img").exists()
    crs.delete("volumes", "pinned-ok")
    wait_for(lambda: not crs.exists("volumes", "pinned-ok"), 60, "deleted")


def test_a_dock_may_not_publish_a_volume_to_itself_or_relabel_objects(
        cluster: Cluster, stack: Stack, processes: Processes, namespace: str, profile: str) -> None:
    crs = CRs(cluster.api, namespace)
    crs.create("volumes", "Volume", "victim", {"size": "4Mi", "profile": profile})
    wait_for(lambda: _available(crs, "victim"), 60, "Available")
    as_dock = CRs(config.new_client_from_config(config_file=str(processes.kubeconfigs["dock"])), namespace)
    with pytest.raises(ApiException) as refused:
        as_dock.patch("volumes", "victim", {"spec": {"publishedNodes": ["evil-node"]}})
    assert refused.value.status in (403, 422)
    assert "never spec" in str(refused.value.body)
    with pytest.raises(ApiException):
        as_dock.patch("volumes", "victim", {"metadata": {"labels": {"opensds.io/backend": "elsewhere"}}})
    as_dock.patch("volumes", "victim", {"metadata": {"annotations": {"dock.opensds.io/probe": "ok"}}})  # allowed
    crs.delete("volumes", "victim")
    wait_for(lambda: not crs.exists("volumes", "victim"), 60, "deleted")


def test_second_dock_on_the_same_backend_waits_until_the_first_is_gone(
        cluster: Cluster, stack: Stack, processes: Processes, namespace: str, profile: str) -> None:
    log = processes.logs / f"second-dock-{uuid.uuid4().hex[:4]}.log"
    venv_bin = ROOT / ".venv" / "bin"
    second = _spawn([str(venv_bin / "opensds-dock"), "--backend", processes.backend, "--capacity-interval", "5"],
                    log, processes.kubeconfigs["dock"])
    try:
        wait_for(lambda: "another dock serves" in log.read_text(), 30, "the second dock to wait")
        crs = CRs(cluster.api, namespace)
        crs.create("volumes", "Volume", "one-writer", {"size": "4Mi", "profile": profile})
        wait_for(lambda: _available(crs, "one-writer"), 60, "Available (served by the first dock)")
        assert "creating vol-" not in log.read_text(), "the waiting dock touched the backend"

        processes.kill("dock")  # the first goes: the second takes the lock and the Lease at once
        wait_for(lambda: "holding Lease" in log.read_text(), 30, "the second dock to take over")
        crs.delete("volumes", "one-writer")
        wait_for(lambda: not crs.exists("volumes", "one-writer"), 60, "deleted by the second dock")
    finally:
        second.terminate()
        try:
            second.wait(15)
        except subprocess.TimeoutExpired:
            second.kill()
        processes.start("dock")


def test_lease_is_not_granted_to_another_host_until_it_lapses(cluster: Cluster) -> None:
    """The cluster-wide half of one-writer-per-backend: two docks on different nodes."""
    backend = f"lease-{uuid.uuid4().hex[:6]}"
    a = BackendLease(cluster.api, backend, "opensds-system", duration_seconds=3)
    b = BackendLease(cluster.api, backend, "opensds-system", duration_seconds=3)
    a.holder, b.holder = "node-a/1", "node-b/1"
    assert a.try_acquire()
    assert not b.try_acquire(), "granted while held and fresh"
    assert a.try_acquire(), "the holder renews"
    time.sleep(3.5)  # a stopped renewing (crashed, partitioned)
    assert b.try_acquire(), "not granted after the lease lapsed"
    assert not a.try_acquire(), "the old holder got it back while b holds it"
    client.CoordinationV1Api(cluster.api).delete_namespaced_lease(f"opensds-dock-{backend}", "opensds-system")


def test_a_repeated_warning_is_one_event_with_a_count_not_one_event_per_retry(
        cluster: Cluster, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from opensds_operator import kube

    monkeypatch.setattr(kube, "api_client", lambda: cluster.api)
    obj = {"apiVersion": "opensds.io/v1alpha1", "kind": "Volume",
           "metadata": {"name": "noisy", "namespace": namespace, "uid": str(uuid.uuid4())}}
    for _ in range(5):
        kube.post_event(obj, "BackendUnavailable", "the pool is offline", warning=True)
    events = client.CoreV1Api(cluster.api).list_namespaced_event(
        namespace, field_selector="involvedObject.name=noisy").items
    assert [(e.reason, e.count) for e in events] == [("BackendUnavailable", 5)]
