"""Every refusal the README's "Bad input" table promises an Event for does post one, with the real
operator and dock (the rest are proven where they happen: BackendObjectMissing and
OrphanQuarantined in test_dock_safety/test_crash_safety, NameConflict in test_volume_lifecycle)."""
from __future__ import annotations

import uuid

from .conftest import ROOT, Cluster, Processes, Stack, _spawn, wait_for
from .helpers import CRs, events_for


def _event(cluster: Cluster, namespace: str, name: str, reason: str, timeout: float = 60) -> str:
    found = wait_for(lambda: next((e for e in events_for(cluster.api, namespace, name)
                                   if e.startswith(f"{reason}: ")), None), timeout, f"a {reason} Event on {name}")
    return str(found)


def test_operator_refusals_post_the_events_the_readme_documents(
        cluster: Cluster, stack: Stack, namespace: str) -> None:
    crs, cluster_crs = CRs(cluster.api, namespace), CRs(cluster.api)
    profile = f"ev-{uuid.uuid4().hex[:6]}"
    cluster_crs.create("storageprofiles", "StorageProfile", profile, {"storageType": "block",
                                                                      "accessProtocol": "local"})
    try:
        crs.create("volumes", "Volume", "no-profile", {"size": "4Mi", "profile": f"missing-{profile}"})
        assert "does not exist; create it or fix spec.profile" in _event(cluster, namespace, "no-profile",
                                                                         "ProfileNotFound")
        crs.create("volumes", "Volume", "too-big", {"size": "1Ti", "profile": profile})
        assert "no pool fits 1Ti" in _event(cluster, namespace, "too-big", "Unschedulable")
        crs.create("volumes", "Volume", "bad-pin", {"size": "4Mi", "profile": profile,
                                                    "backend": stack.backend, "pool": "no-such-pool"})
        assert "pinned placement" in _event(cluster, namespace, "bad-pin", "PlacementInvalid")

        crs.create("volumes", "Volume", "user", {"size": "4Mi", "profile": profile})
        wait_for(lambda: (crs.get("volumes", "user").get("status") or {}).get("phase") == "Available", 60,
                 "Available")
        cluster_crs.delete("storageprofiles", profile)
        # Cluster-scoped objects' Events land in "default".
        assert "still used by Volumes" in _event(cluster, "default", profile, "DeletionBlocked")
    finally:
        for name in ("no-profile", "too-big", "bad-pin", "user"):
            crs.delete_if_present("volumes", name)
        wait_for(lambda: not crs.api.list_namespaced_custom_object("opensds.io", "v1alpha1", namespace,
                                                                    "volumes")["items"], 60, "volumes gone")
        cluster_crs.delete_if_present("storageprofiles", profile)


def test_a_dock_for_a_driver_not_in_this_release_reports_invalid_parameters_and_keeps_running(
        cluster: Cluster, processes: Processes) -> None:
    backend = f"nfs-{uuid.uuid4().hex[:6]}"
    crs = CRs(cluster.api)
    crs.create("storagebackends", "StorageBackend", backend, {"driver": "nfs", "parameters": {"path": "/srv"}})
    log = processes.logs / f"{backend}.log"
    dock = _spawn([str(ROOT / ".venv" / "bin" / "opensds-dock"), "--backend", backend], log,
                  processes.kubeconfigs["dock"])
    try:
        message = _event(cluster, "default", backend, "InvalidParameters")
        assert "driver 'nfs' is not available in this release" in message
        ready = next(c for c in crs.get("storagebackends", backend)["status"]["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "InvalidParameters")
        assert dock.poll() is None, "the dock crash-looped instead of waiting for an edit"
    finally:
        dock.kill()
        dock.wait(10)
        crs.delete_if_present("storagebackends", backend)
