"""Operator handlers: profiles -> StorageClasses, Volume/Snapshot placement, in-use protection.

Placement is recorded in the Volume's spec (backend, pool) the way kube-scheduler records
a pod's node: desired state lands in the API first, and only then does the chosen
backend's dock touch anything.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .. import kube
from ..api import (
    BACKEND_LABEL,
    BACKENDS,
    CODE_CROSS_NAMESPACE_SOURCE,
    CODE_PLACEMENT_INVALID,
    CODE_PROFILE_NOT_FOUND,
    CODE_SOURCE_NOT_FOUND,
    CODE_UNSCHEDULABLE,
    GROUP,
    IN_USE,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NAME_CONFLICT,
    PENDING,
    POOL_LABEL,
    PROFILES,
    READY,
    SCHEDULED,
    SNAPSHOTS,
    VERSION,
    VOLUMES,
)
from ..conditions import get_condition, set_condition
from ..credentials import SECRET_NAME, authenticated_by_default, credentials_namespace, generated_secret_body
from ..quantity import parse_bytes
from ..scheduler import Pool, PoolKey, pools_from_backend, request_for, schedule
from ..storageclass import is_managed, needs_recreate, snapshot_class, storage_class

log = logging.getLogger(__name__)
registry = kopf.OperatorRegistry()

# Placements made by this process and not yet seen in the index (uid -> (pool, bytes)).
_placement_lock = threading.Lock()
_recent_placements: dict[str, tuple[PoolKey, int]] = {}


class Settings:
    default_over_subscription_ratio = 1.0
    retry_unschedulable_seconds = 20.0
    retry_name_conflict_seconds = 30.0  # the foreign object may be renamed or removed meanwhile
    credentials_namespace = credentials_namespace()


# ---------------------------------------------------------------- StorageProfile

def _storage_api() -> client.StorageV1Api:
    return client.StorageV1Api(kube.api_client())


CONFLICT = "conflict"  # sync outcome: an object of that name exists and is not the operator's


def sync_storage_class(name: str, spec: dict[str, Any]) -> str:
    """Converge the profile's StorageClass; a same-named one the operator did not make is left alone."""
    desired = storage_class(name, spec, Settings.credentials_namespace)
    api = _storage_api()
    try:
        existing = api.read_storage_class(name)
    except ApiException as e:
        if e.status != 404:
            raise
        api.create_storage_class(desired)
        return "created"
    current = kube.api_client().sanitize_for_serialization(existing)
    if not is_managed(current):
        return CONFLICT
    if needs_recreate(current, desired):
        api.delete_storage_class(name)
        api.create_storage_class(desired)
        return "recreated"
    if current.get("allowVolumeExpansion") != desired["allowVolumeExpansion"]:
        api.patch_storage_class(name, {"allowVolumeExpansion": desired["allowVolumeExpansion"]})
        return "updated"
    return "unchanged"


VSC = ("snapshot.storage.k8s.io", "v1", "volumesnapshotclasses")
SNAPSHOT_CRDS_ABSENT = "absent"


def sync_snapshot_class(name: str) -> str:
    """"synced", CONFLICT (a same-named class not ours: untouched), or SNAPSHOT_CRDS_ABSENT (optional then)."""
    api = kube.custom()
    body = snapshot_class(name)
    try:
        current = api.get_cluster_custom_object(*VSC, name)
    except ApiException as e:
        if e.status != 404:
            raise
        try:
            api.create_cluster_custom_object(*VSC, body)
        except ApiException as e2:
            if e2.status == 404:
                return SNAPSHOT_CRDS_ABSENT
            raise
        return "synced"
    if not is_managed(current):
        return CONFLICT
    metadata = {**body["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}
    api.replace_cluster_custom_object(*VSC, name, {**body, "metadata": metadata})
    return "synced"


def ensure_generated_credentials(profile: str) -> None:
    """The shared generated node-stage Secret (credentials.py) exists; never rewritten once made."""
    namespace = Settings.credentials_namespace
    body = generated_secret_body(namespace)
    try:
        client.CoreV1Api(kube.api_client()).create_namespaced_secret(namespace, body)
        log.info("generated node-stage credentials %s/%s for authenticated exports (profile %s)",
                 namespace, SECRET_NAME, profile)
    except ApiException as e:
        if e.status == 409:  # made before: keep its keys, nodes and targets use them
            return
        raise kopf.TemporaryError(f"cannot create the generated node-stage Secret {namespace}/{SECRET_NAME} "
                                  f"({e.status} {e.reason}); profile {profile} needs it for authenticated "
                                  f"exports (or set spec.unauthenticatedExports: true)", delay=30) from None


@kopf.on.resume(GROUP, VERSION, PROFILES, registry=registry)
@kopf.on.create(GROUP, VERSION, PROFILES, registry=registry)
@kopf.on.update(GROUP, VERSION, PROFILES, field="spec", registry=registry)
def profile_reconcile(name: str, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
                      body: kopf.Body, **_: Any) -> None:
    spec_d = dict(spec)
    generation = meta.get("generation")
    if authenticated_by_default(spec_d):
        ensure_generated_credentials(name)
    outcome = sync_storage_class(name, spec_d)
    vsc = sync_snapshot_class(name)
    conditions = status.get("conditions")
    foreign = [f"{kind} {name}" for kind, result in (("StorageClass", outcome), ("VolumeSnapshotClass", vsc))
               if result == CONFLICT]
    if foreign:
        message = (f"{' and '.join(foreign)} already exist{'s' if len(foreign) == 1 else ''} and "
                   f"{'was' if len(foreign) == 1 else 'were'} not made by the operator (no label "
                   f"{MANAGED_BY_LABEL}={MANAGED_BY}); left untouched. Rename the profile, or delete the other "
                   f"object if it is not needed")
        conditions = set_condition(conditions, NAME_CONFLICT, True, NAME_CONFLICT, message, generation)
        conditions = set_condition(conditions, READY, False, NAME_CONFLICT, message, generation)
        kube.patch_status(PROFILES, name, {
            "storageClassName": None if outcome == CONFLICT else name,
            "volumeSnapshotClassName": name if vsc == "synced" else None,
            "observedGeneration": generation,
            "conditions": conditions,
        })
        kube.post_event(dict(body), NAME_CONFLICT, message, warning=True)
        raise kopf.TemporaryError(message, delay=Settings.retry_name_conflict_seconds)
    if get_condition(conditions, NAME_CONFLICT):
        conditions = set_condition(conditions, NAME_CONFLICT, False, "Resolved", "", generation)
    conditions = set_condition(conditions, READY, True, "StorageClassSynced",
                               f"StorageClass {name} {outcome}"
                               + ("" if vsc == "synced" else "; snapshot CRDs absent"), generation)
    kube.patch_status(PROFILES, name, {
        "storageClassName": name,
        "volumeSnapshotClassName": name if vsc == "synced" else None,
        "observedGeneration": generation,
        "conditions": conditions,
    })
    if outcome != "unchanged":
        kube.post_event(dict(body), "StorageClassSynced", f"StorageClass {name} {outcome}")


def volumes_where(field: str, value: str) -> list[str]:
    """namespace/name of every Volume whose spec.<field> is value."""
    return sorted(
        f"{v['metadata']['namespace']}/{v['metadata']['name']}"
        for v in kube.list_all(VOLUMES) if v.get("spec", {}).get(field) == value
    )


def refuse_deletion_while_used(plural: str, what: str, body: kopf.Body, users: list[str]) -> None:
    """In-use protection (like kubernetes.io/pvc-protection): keep the finalizer, say who uses it."""
    name = body["metadata"]["name"]
    shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
    message = f"{what} {name} is still used by Volumes {shown}; delete them first"
    kube.patch_status(plural, name, {"conditions": set_condition(
        (body.get("status") or {}).get("conditions"), IN_USE, True, "DeletionBlocked", message)})
    kube.post_event(dict(body), "DeletionBlocked", message, warning=True)
    raise kopf.TemporaryError(message, delay=15)


@kopf.on.delete(GROUP, VERSION, PROFILES, registry=registry)
def profile_delete(name: str, body: kopf.Body, **_: Any) -> None:
    if users := volumes_where("profile", name):
        refuse_deletion_while_used(PROFILES, "StorageProfile", body, users)
    _delete_if_ours(_storage_api().read_storage_class, _storage_api().delete_storage_class, name)
    _delete_if_ours(lambda n: kube.custom().get_cluster_custom_object(*VSC, n),
                    lambda n: kube.custom().delete_cluster_custom_object(*VSC, n), name)


def _delete_if_ours(read: Callable[[str], Any], delete: Callable[[str], object], name: str) -> None:
    """Delete the profile's StorageClass / VolumeSnapshotClass, but never a same-named one of someone else."""
    try:
        current = read(name)
        if not is_managed(kube.api_client().sanitize_for_serialization(current)):
            log.info("not deleting %s: it was not made by the operator", name)
            return
        delete(name)
    except ApiException as e:
        if e.status != 404:
            raise


@kopf.on.delete(GROUP, VERSION, BACKENDS, registry=registry)
def backend_delete(name: str, body: kopf.Body, **_: Any) -> None:
    if users := volumes_where("backend", name):
        refuse_deletion_while_used(BACKENDS, "StorageBackend", body, users)


# ---------------------------------------------------------------- Volume placement

@kopf.index(GROUP, VERSION, BACKENDS, registry=registry)
async def backend_pools(name: str, body: kopf.Body, **_: Any) -> dict[str, list[Pool]]:
    """StorageBackend name -> its pools as the scheduler sees them (kept current by the watch)."""
    return {name: pools_from_backend(dict(body), Settings.default_over_subscription_ratio)}


@kopf.index(GROUP, VERSION, PROFILES, registry=registry)
async def profile_specs(name: str, spec: kopf.Spec, **_: Any) -> dict[str, dict[str, Any]]:
    return {name: dict(spec)}


@kopf.index(GROUP, VERSION, VOLUMES, registry=registry)
async def placed_volumes(spec: kopf.Spec, uid: str, **_: Any) -> dict[PoolKey, tuple[str, int]] | None:
    """(backend, pool) -> (uid, bytes) for every Volume already placed."""
    if not spec.get("backend") or not spec.get("pool"):
        return None
    try:
        size = parse_bytes(spec["size"])
    except ValueError:
        return None
    return {(spec["backend"], spec["pool"]): (uid, size)}


def committed_bytes(index: kopf.Index[PoolKey, tuple[str, int]]) -> dict[PoolKey, int]:
    per_pool: dict[PoolKey, dict[str, int]] = {}
    for key in index:
        for uid, size in index[key]:
            per_pool.setdefault(key, {})[uid] = size
    for uid, (key, size) in _recent_placements.items():
        per_pool.setdefault(key, {})[uid] = size
    return {key: sum(sizes.values()) for key, sizes in per_pool.items()}


class Unschedulable(kopf.TemporaryError):
    pass


def _fail_pending(body: kopf.Body, status: dict[str, Any], reason: str, message: str, plural: str,
                  delay: float, permanent: bool = False) -> None:
    meta = body["metadata"]
    kube.patch_status(plural, meta["name"], {
        "phase": PENDING if plural == VOLUMES else None,
        "code": reason,
        "conditions": set_condition(status.get("conditions"), SCHEDULED, False, reason, message,
                                    meta.get("generation")),
    }, namespace=meta["namespace"])
    kube.post_event(dict(body), reason, message, warning=True)
    if permanent:
        raise kopf.PermanentError(message)
    raise kopf.TemporaryError(message, delay=delay)


def _source_pool(namespace: str, source: dict[str, Any], body: kopf.Body,
                 status: dict[str, Any]) -> PoolKey | None:
    if source.get("namespace") not in (None, namespace):
        _fail_pending(body, status, CODE_CROSS_NAMESPACE_SOURCE,
                      f"source {source['kind']} {source['namespace']}/{source['name']} is in another namespace; "
                      f"only sources in {namespace} can be used", VOLUMES, 0, permanent=True)
    plural = SNAPSHOTS if source["kind"] == "Snapshot" else VOLUMES
    obj = kube.get(plural, source["name"], namespace)
    if obj is None:
        _fail_pending(body, status, CODE_SOURCE_NOT_FOUND,
                      f"source {source['kind']} {namespace}/{source['name']} does not exist; create it or fix "
                      f"spec.source", VOLUMES, Settings.retry_unschedulable_seconds)
        return None
    if plural == SNAPSHOTS:
        labels = obj["metadata"].get("labels", {})
        backend, pool = labels.get(BACKEND_LABEL), labels.get(POOL_LABEL)
    else:
        backend, pool = obj["spec"].get("backend"), obj["spec"].get("pool")
    if not backend or not pool:
        raise kopf.TemporaryError(f"source {source['kind']} {source['name']} is not placed yet", delay=5)
    return (backend, pool)


def _not_placed(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    """Every Volume goes through the scheduler until it is both Scheduled=True and placed in spec.

    A pinned placement is checked like any other (the dock acts only on Scheduled=True); and
    a Volume whose Scheduled=True status landed but whose spec write did not (the apiserver
    went away in between: found by the chaos test) is scheduled again, not left stranded."""
    condition = next((c for c in status.get("conditions") or [] if c.get("type") == SCHEDULED), None)
    scheduled = condition is not None and condition.get("status") == "True"
    return not (scheduled and spec.get("backend") and spec.get("pool"))


@kopf.on.resume(GROUP, VERSION, VOLUMES, registry=registry, when=_not_placed)
@kopf.on.create(GROUP, VERSION, VOLUMES, registry=registry, when=_not_placed)
def volume_schedule(name: str, namespace: str | None, uid: str, spec: kopf.Spec, status: kopf.Status,
                    body: kopf.Body, **kwargs: Any) -> None:
    assert namespace is not None
    placed_volumes: kopf.Index[PoolKey, tuple[str, int]] = kwargs["placed_volumes"]
    backend_pools: kopf.Index[str, list[Pool]] = kwargs["backend_pools"]
    profile_specs: kopf.Index[str, dict[str, Any]] = kwargs["profile_specs"]
    status_d = dict(status)
    known = profile_specs.get(spec["profile"])
    profile = {"spec": next(iter(known))} if known else kube.get(PROFILES, spec["profile"])
    if profile is None:
        _fail_pending(body, status_d, CODE_PROFILE_NOT_FOUND,
                      f"StorageProfile {spec['profile']} does not exist; create it or fix spec.profile",
                      VOLUMES, Settings.retry_unschedulable_seconds)
        return
    size = parse_bytes(spec["size"])
    source_pool = _source_pool(namespace, dict(spec["source"]), body, status_d) if spec.get("source") else None
    request = replace(request_for(dict(spec), profile.get("spec", {}), size, source_pool), at=time.time())
    pools = [p for name_ in backend_pools for pools_ in backend_pools[name_] for p in pools_]
    with _placement_lock:
        decision = schedule(request, pools, committed_bytes(placed_volumes))
        if decision.pool is None:
            # The index trails the API by an event: a backend that just became Ready (typical
            # right after start-up) is seen in a fresh read instead of after a retry delay.
            pools = [p for b in kube.list_all(BACKENDS)
                     for p in pools_from_backend(b, Settings.default_over_subscription_ratio)]
            decision = schedule(request, pools, committed_bytes(placed_volumes))
        if decision.pool is None:
            if spec.get("backend") or spec.get("pool"):
                message = (f"the pinned placement {spec.get('backend') or '*'}/{spec.get('pool') or '*'} cannot take "
                           f"{spec['size']} of profile {spec['profile']}: {decision.explain()}")
                reason = CODE_PLACEMENT_INVALID
            else:
                message = f"no pool fits {spec['size']} of profile {spec['profile']}: {decision.explain()}"
                reason = CODE_UNSCHEDULABLE
            _fail_pending(body, status_d, reason, message, VOLUMES, Settings.retry_unschedulable_seconds)
            return
        chosen = decision.pool
        _recent_placements[uid] = (chosen.key, size)  # counted from now on; the API write is outside the lock
    try:
        # Status first: once spec names the backend its dock may finish and mark the Volume
        # Available at once, and a later "Pending" from here would overwrite that.
        kube.patch_status(VOLUMES, name, {
            "phase": PENDING,
            "code": None,
            "conditions": set_condition(status_d.get("conditions"), SCHEDULED, True, "Scheduled",
                                        f"placed on {chosen.label}", body["metadata"].get("generation")),
        }, namespace=namespace)
        kube.patch(VOLUMES, name, {"spec": {"backend": chosen.backend, "pool": chosen.name}}, namespace)
    except Exception:
        with _placement_lock:
            _recent_placements.pop(uid, None)
        raise
    kube.post_event(dict(body), "Scheduled", f"placed on {chosen.label}")


@kopf.on.event(GROUP, VERSION, VOLUMES, registry=registry)
async def forget_recent_placement(uid: str, spec: kopf.Spec, type: str | None, **_: Any) -> None:
    """Once the index has seen a placement (or the Volume is gone), stop counting it twice.

    Async (and the index functions too): pure bookkeeping, so it runs on kopf's event loop
    instead of paying a thread-pool hop for each of the many events a Volume produces."""
    if type == "DELETED" or spec.get("backend"):
        with _placement_lock:
            _recent_placements.pop(uid, None)


# ---------------------------------------------------------------- Snapshot placement

@kopf.on.resume(GROUP, VERSION, SNAPSHOTS, registry=registry,
                labels={BACKEND_LABEL: kopf.ABSENT})
@kopf.on.create(GROUP, VERSION, SNAPSHOTS, registry=registry,
                labels={BACKEND_LABEL: kopf.ABSENT})
def snapshot_place(name: str, namespace: str | None, spec: kopf.Spec, status: kopf.Status, body: kopf.Body,
                   **_: Any) -> None:
    assert namespace is not None
    """A snapshot lives where its source volume lives: label it so that backend's dock takes it."""
    volume = kube.get(VOLUMES, spec["volumeName"], namespace)
    if volume is None:
        _fail_pending(body, dict(status), CODE_SOURCE_NOT_FOUND,
                      f"Volume {namespace}/{spec['volumeName']} does not exist; create it or fix spec.volumeName",
                      SNAPSHOTS, Settings.retry_unschedulable_seconds)
        return
    backend, pool = volume["spec"].get("backend"), volume["spec"].get("pool")
    if not backend or not pool:
        raise kopf.TemporaryError(f"Volume {spec['volumeName']} is not placed yet", delay=5)
    kube.patch(SNAPSHOTS, name, {"metadata": {"labels": {BACKEND_LABEL: backend, POOL_LABEL: pool}}}, namespace)
