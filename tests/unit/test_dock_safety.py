"""The dock's data-safety rules, driven through an in-memory API and the real file driver.

Each test names a way the dock used to lose data (issue 9, items 1, 3 and 12): it re-created a
missing volume blank, re-took a missing snapshot, swept objects it could not prove were its
garbage, kept Retain records where a lost StorageBackend took them along, and acted on
placements the operator had not validated.
"""
from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import kopf
import pytest

from opensds_operator.api import (
    AVAILABLE,
    BACKENDS,
    CODE_BACKEND_OBJECT_MISSING,
    DOCK_FINALIZER,
    POOL_LABEL,
    PROFILES,
    SNAPSHOTS,
    VOLUMES,
)
from opensds_operator.drivers.base import Owner
from opensds_operator.drivers.file import FileDriver
from opensds_operator.handlers.dock import Dock, reported

CLUSTER = "11111111-2222-3333-4444-555555555555"
BACKEND = "local-file"
NS = "apps"


class FakeApi:
    """Just enough of the API for the dock: objects by (plural, namespace, name), merge-patched status."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []
        self.fail_next: Exception | None = None

    def add(self, plural: str, name: str, spec: dict[str, Any], namespace: str | None = NS,
            status: dict[str, Any] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
        obj = {"metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "generation": 1,
                            "finalizers": [DOCK_FINALIZER], "labels": labels or {}},
               "spec": spec, "status": status or {}}
        self.objects[(plural, namespace, name)] = obj
        return obj

    def get(self, plural: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        obj = self.objects.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj else None

    def list_all(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (p, _, _), o in self.objects.items() if p == plural]

    def patch_status(self, plural: str, name: str, status: dict[str, Any],
                     namespace: str | None = None) -> dict[str, Any] | None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            return None
        for key, value in status.items():
            if value is None:
                obj["status"].pop(key, None)
            else:
                obj["status"][key] = copy.deepcopy(value)
        return copy.deepcopy(obj)

    def post_event(self, obj: dict[str, Any], reason: str, message: str, warning: bool = False,
                   component: str = "opensds") -> None:
        self.events.append((obj["metadata"]["name"], reason, message))

    def secret_data(self, name: str, namespace: str) -> dict[str, str] | None:
        return None

    def remove_finalizer(self, plural: str, name: str, finalizer: str, namespace: str | None = None) -> None:
        obj = self.objects.get((plural, namespace, name))
        if obj is not None and finalizer in obj["metadata"]["finalizers"]:
            obj["metadata"]["finalizers"].remove(finalizer)

    def cluster_id(self) -> str:
        return CLUSTER


SCHEDULED = {"conditions": [{"type": "Scheduled", "status": "True", "reason": "Scheduled"}]}


@pytest.fixture
def api() -> FakeApi:
    fake = FakeApi()
    fake.add(BACKENDS, BACKEND, {"driver": "file"}, namespace=None)
    fake.add(PROFILES, "thin", {"storageType": "block", "accessProtocol": "local"}, namespace=None)
    return fake


@pytest.fixture
def driver(tmp_path: Path) -> FileDriver:
    return FileDriver(str(tmp_path / "backend"))


@pytest.fixture
def dock(api: FakeApi, driver: FileDriver) -> Dock:
    d = Dock(BACKEND, driver, api=api, quarantine_seconds=3600)
    d.capacity_changed = lambda: None  # type: ignore[method-assign]
    return d


def _volume(api: FakeApi, name: str = "data", status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return api.add(VOLUMES, name, {"size": "4Mi", "profile": "thin", "backend": BACKEND, "pool": "default", **spec},
                   status=copy.deepcopy(status if status is not None else SCHEDULED))


def _body(api: FakeApi, plural: str, name: str, namespace: str | None = NS) -> kopf.Body:
    obj = api.get(plural, name, namespace)
    assert obj is not None
    return kopf.Body(obj)


def test_volume_that_was_available_is_never_recreated_when_its_object_is_missing(
        api: FakeApi, dock: Dock, driver: FileDriver) -> None:
    vol = _volume(api)
    dock.reconcile_volume(_body(api, VOLUMES, "data"))
    backend_id = f"vol-{vol['metadata']['uid']}"
    assert api.get(VOLUMES, "data", NS)["status"]["phase"] == AVAILABLE  # type: ignore[index]
    driver.delete_volume(backend_id, "default")  # the disk is not mounted yet, the VG inactive, ...

    with pytest.raises(kopf.TemporaryError):
        dock.reconcile_volume(_body(api, VOLUMES, "data"))
    assert driver.get_volume(backend_id, "default") is None, "a blank volume was made in place of the lost one"
    status = api.get(VOLUMES, "data", NS)["status"]  # type: ignore[index]
    assert status["code"] == CODE_BACKEND_OBJECT_MISSING
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", CODE_BACKEND_OBJECT_MISSING)
    assert any(reason == CODE_BACKEND_OBJECT_MISSING for _, reason, _ in api.events)


def test_volume_whose_object_returns_is_available_again(api: FakeApi, dock: Dock, driver: FileDriver,
                                                       tmp_path: Path) -> None:
    vol = _volume(api)
    dock.reconcile_volume(_body(api, VOLUMES, "data"))
    image = Path(driver.get_volume(f"vol-{vol['metadata']['uid']}", "default").path)  # type: ignore[union-attr]
    aside = tmp_path / "aside.img"
    image.rename(aside)
    with pytest.raises(kopf.TemporaryError):
        dock.reconcile_volume(_body(api, VOLUMES, "data"))
    aside.rename(image)  # the disk is mounted again
    dock.reconcile_volume(_body(api, VOLUMES, "data"))
    status = api.get(VOLUMES, "data", NS)["status"]  # type: ignore[index]
    assert status["phase"] == AVAILABLE and "code" not in status


def test_publish_of_a_volume_whose_object_is_missing_is_refused(api: FakeApi, dock: Dock,
                                                               driver: FileDriver) -> None:
    vol = _volume(api)
    dock.reconcile_volume(_body(api, VOLUMES, "data"))
    driver.delete_volume(f"vol-{vol['metadata']['uid']}", "default")
    api.objects[(VOLUMES, NS, "data")]["spec"]["publishedNodes"] = ["node-1"]
    with pytest.raises(kopf.TemporaryError):
        dock.reconcile_access(_body(api, VOLUMES, "data"))
    assert "publishContext" not in api.get(VOLUMES, "data", NS)["status"]  # type: ignore[index]


def test_ready_snapshot_that_is_missing_is_not_taken_again(api: FakeApi, dock: Dock, driver: FileDriver) -> None:
    _volume(api)
    dock.reconcile_volume(_body(api, VOLUMES, "data"))
    snap = api.add(SNAPSHOTS, "snap", {"volumeName": "data"}, labels={POOL_LABEL: "default"})
    dock.reconcile_snapshot(_body(api, SNAPSHOTS, "snap"))
    snap_id = f"snap-{snap['metadata']['uid']}"
    assert snap_id in driver.list_objects("default")
    driver.delete_snapshot(snap_id, "default")

    with pytest.raises(kopf.TemporaryError):
        dock.reconcile_snapshot(_body(api, SNAPSHOTS, "snap"))
    assert snap_id not in driver.list_objects("default"), "a new point in time was taken under the old name"
    assert api.get(SNAPSHOTS, "snap", NS)["status"]["code"] == CODE_BACKEND_OBJECT_MISSING  # type: ignore[index]


def test_dock_does_not_act_on_a_placement_the_operator_has_not_validated(
        api: FakeApi, dock: Dock, driver: FileDriver) -> None:
    vol = _volume(api, status={})  # spec pins backend and pool, Scheduled not True
    with pytest.raises(kopf.TemporaryError, match="Scheduled"):
        dock.reconcile_volume(_body(api, VOLUMES, "data"))
    assert driver.get_volume(f"vol-{vol['metadata']['uid']}", "default") is None


def test_objects_are_tagged_with_cluster_backend_and_owner(api: FakeApi, dock: Dock, driver: FileDriver) -> None:
    vol = _volume(api)
    dock.reconcile_volume(_body(api, VOLUMES, "data"))
    (found,) = driver.scan("default")
    assert found.owner == Owner(CLUSTER, BACKEND, "Volume", NS, "data", vol["metadata"]["uid"])


def test_sweep_never_touches_untagged_or_other_clusters_objects(
        api: FakeApi, dock: Dock, driver: FileDriver) -> None:
    untagged = f"vol-{uuid.uuid4()}"
    driver.create_volume(untagged, "default", 1 << 20, True)
    theirs = f"vol-{uuid.uuid4()}"
    other = Owner("99999999-2222-3333-4444-555555555555", BACKEND, "Volume", NS, "x", theirs[4:])
    driver.create_volume(theirs, "default", 1 << 20, True, owner=other)
    other_backend = f"vol-{uuid.uuid4()}"
    driver.create_volume(other_backend, "default", 1 << 20, True,
                         owner=Owner(CLUSTER, "elsewhere", "Volume", NS, "y", other_backend[4:]))

    assert dock.collect_orphans() == []
    assert set(driver.list_objects("default")) == {untagged, theirs, other_backend}
    assert api.get(BACKENDS, BACKEND)["status"]["foreignObjects"] == 3  # type: ignore[index]


def test_sweep_quarantines_our_orphans_and_purges_them_only_after_the_period(
        api: FakeApi, dock: Dock, driver: FileDriver) -> None:
    orphan = f"vol-{uuid.uuid4()}"
    driver.create_volume(orphan, "default", 1 << 20, True,
                         owner=Owner(CLUSTER, BACKEND, "Volume", NS, "gone", orphan[4:]))
    assert dock.collect_orphans() == [orphan]
    assert orphan not in driver.list_objects("default")
    (kept,) = driver.scan("default")
    assert kept.backend_id == orphan and kept.quarantined_at is not None, "quarantine must keep the data"
    assert any(reason == "OrphanQuarantined" for _, reason, _ in api.events)

    assert dock.collect_orphans() == [], "purged before the quarantine period ended"
    dock.quarantine_seconds = 0
    assert dock.collect_orphans() == [orphan]
    assert driver.scan("default") == []


def test_volume_restored_under_a_new_uid_does_not_lose_the_old_data_at_once(
        api: FakeApi, dock: Dock, driver: FileDriver) -> None:
    """GitOps re-apply / Velero restore: same namespace/name, new UID. The old object is kept aside."""
    vol = _volume(api)
    dock.reconcile_volume(_body(api, VOLUMES, "data"))
    old_id = f"vol-{vol['metadata']['uid']}"
    del api.objects[(VOLUMES, NS, "data")]
    _volume(api)  # re-created: a new UID
    dock.collect_orphans()
    assert any(o.backend_id == old_id and o.quarantined_at for o in driver.scan("default"))


def test_retain_is_recorded_on_the_object_and_outlives_the_backend_cr(
        api: FakeApi, dock: Dock, driver: FileDriver) -> None:
    for name in ("a", "b"):  # two Retain deletions: neither record may be lost
        _volume(api, name, reclaimPolicy="Retain")
        dock.reconcile_volume(_body(api, VOLUMES, name))
    ids = {f"vol-{api.get(VOLUMES, n, NS)['metadata']['uid']}" for n in ("a", "b")}  # type: ignore[index]
    for name in ("a", "b"):
        dock.delete_volume(_body(api, VOLUMES, name))
        del api.objects[(VOLUMES, NS, name)]
    del api.objects[(BACKENDS, None, BACKEND)]  # the StorageBackend CR (and its status) is gone

    dock.quarantine_seconds = 0
    dock.collect_orphans()
    dock.collect_orphans()
    assert set(driver.list_objects("default")) == ids
    assert all(o.owner and o.owner.retained for o in driver.scan("default"))


def test_unexpected_errors_become_a_condition_and_a_retry(api: FakeApi, dock: Dock) -> None:
    _volume(api)

    def explode(body: kopf.Body) -> None:
        raise RuntimeError("rtslib said no")

    with pytest.raises(kopf.TemporaryError):
        reported(dock, VOLUMES, _body(api, VOLUMES, "data"), explode)
    status = api.get(VOLUMES, "data", NS)["status"]  # type: ignore[index]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "rtslib said no" in ready["message"]


def test_quarantined_object_is_reported_in_backend_status(api: FakeApi, dock: Dock, driver: FileDriver) -> None:
    orphan = f"vol-{uuid.uuid4()}"
    driver.create_volume(orphan, "default", 1 << 20, True,
                         owner=Owner(CLUSTER, BACKEND, "Volume", NS, "gone", orphan[4:]))
    dock.collect_orphans()
    assert api.get(BACKENDS, BACKEND)["status"]["quarantinedObjects"] == 1  # type: ignore[index]


def test_deleting_an_object_made_before_per_backend_finalizers_releases_the_shared_one_too(
        api: FakeApi, dock: Dock, driver: FileDriver) -> None:
    _volume(api)
    dock.reconcile_volume(_body(api, VOLUMES, "data"))
    assert DOCK_FINALIZER in api.objects[(VOLUMES, NS, "data")]["metadata"]["finalizers"]
    dock.delete_volume(_body(api, VOLUMES, "data"))
    assert DOCK_FINALIZER not in api.objects[(VOLUMES, NS, "data")]["metadata"]["finalizers"], (
        "the legacy finalizer would keep the Volume forever")


def test_deleting_a_volume_whose_placement_was_never_validated_does_not_get_stuck(
        api: FakeApi, dock: Dock) -> None:
    """Pinned to a pool the backend lacks: nothing was made, so deletion must not retry forever."""
    _volume(api, status={}, pool="no-such-pool")
    dock.delete_volume(_body(api, VOLUMES, "data"))  # no TemporaryError
