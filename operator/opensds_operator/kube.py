"""Thin helpers over the kubernetes client for our custom resources and Events."""
from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .api import GROUP, VERSION
from .conditions import now

log = logging.getLogger(__name__)
Obj = dict[str, Any]


@functools.cache
def api_client() -> client.ApiClient:
    """One client per process: in-cluster credentials, else $KUBECONFIG / ~/.kube/config."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    # Handlers run in kopf's thread pool: one pooled connection per worker avoids a new TLS
    # handshake for every call once more than urllib3's default 10 are busy.
    configuration.connection_pool_maxsize = 64
    return client.ApiClient(configuration)


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


def get(plural: str, name: str, namespace: str | None = None) -> Obj | None:
    try:
        if namespace:
            obj: Obj = custom().get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        else:
            obj = custom().get_cluster_custom_object(GROUP, VERSION, plural, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return obj


def list_all(plural: str, namespace: str | None = None) -> list[Obj]:
    if namespace:
        result = custom().list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
    else:
        result = custom().list_cluster_custom_object(GROUP, VERSION, plural)
    items: list[Obj] = result.get("items", [])
    return items


def patch(plural: str, name: str, body: Obj, namespace: str | None = None) -> Obj:
    if namespace:
        obj: Obj = custom().patch_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, body)
    else:
        obj = custom().patch_cluster_custom_object(GROUP, VERSION, plural, name, body)
    return obj


def create(plural: str, body: Obj, namespace: str) -> Obj:
    obj: Obj = custom().create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
    return obj


def delete(plural: str, name: str, namespace: str) -> bool:
    """Request deletion; False when the object is already gone."""
    try:
        custom().delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def remove_finalizer(plural: str, name: str, finalizer: str, namespace: str | None = None) -> None:
    """Drop one finalizer with a JSON patch that tests its position first (no lost concurrent edit)."""
    obj = get(plural, name, namespace)
    finalizers = list(((obj or {}).get("metadata") or {}).get("finalizers") or [])
    if finalizer not in finalizers:
        return
    i = finalizers.index(finalizer)
    body = [{"op": "test", "path": f"/metadata/finalizers/{i}", "value": finalizer},
            {"op": "remove", "path": f"/metadata/finalizers/{i}"}]
    try:
        patch(plural, name, body, namespace)  # type: ignore[arg-type]
    except ApiException as e:
        if e.status not in (404, 422):  # gone, or moved meanwhile: the next delete pass retries
            raise


def patch_status(plural: str, name: str, status: Obj, namespace: str | None = None) -> Obj | None:
    """Merge-patch status; None when the object is already gone."""
    try:
        if namespace:
            obj: Obj = custom().patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, {"status": status}
            )
        else:
            obj = custom().patch_cluster_custom_object_status(GROUP, VERSION, plural, name, {"status": status})
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return obj


# Recent Events by (namespace, object uid, type, reason, message) -> (event name, count): a
# repeat bumps the existing Event's count instead of adding one more Warning every retry
# (what client-go's EventCorrelator does for controllers written in Go).
_EVENT_CACHE_SIZE = 4096
_recent_events: OrderedDict[tuple[str, str, str, str, str], tuple[str, int]] = OrderedDict()
_events_lock = threading.Lock()


def _terminating(e: ApiException) -> bool:
    """An Event into a namespace being deleted is refused with 403; that one is expected."""
    return e.status == 403 and "being terminated" in str(e.body or "")


def post_event(obj: Obj, reason: str, message: str, warning: bool = False, component: str = "opensds") -> None:
    """Record an Event on `obj`, de-duplicated; best effort (a failed Event must not fail a reconcile)."""
    meta = obj["metadata"]
    namespace = meta.get("namespace") or "default"
    type_ = "Warning" if warning else "Normal"
    message = message[:1024]
    key = (namespace, str(meta.get("uid") or meta["name"]), type_, reason, message)
    core = client.CoreV1Api(api_client())
    with _events_lock:
        seen = _recent_events.get(key)
    try:
        if seen is not None:
            name, count = seen
            try:
                core.patch_namespaced_event(name, namespace, {"count": count + 1, "lastTimestamp": now()})
                with _events_lock:
                    _recent_events[key] = (name, count + 1)
                    _recent_events.move_to_end(key)
                return
            except ApiException as e:
                if e.status != 404:  # expired or deleted: post a fresh one
                    raise
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}."),
            involved_object=client.V1ObjectReference(
                api_version=obj.get("apiVersion", f"{GROUP}/{VERSION}"),
                kind=obj.get("kind"),
                name=meta["name"],
                namespace=meta.get("namespace"),
                uid=meta.get("uid"),
            ),
            reason=reason,
            message=message,
            type=type_,
            first_timestamp=now(),
            last_timestamp=now(),
            count=1,
            source=client.V1EventSource(component=component),
            reporting_component=component,
        )
        created = core.create_namespaced_event(namespace, event)
        with _events_lock:
            _recent_events[key] = (created.metadata.name, 1)
            while len(_recent_events) > _EVENT_CACHE_SIZE:
                _recent_events.popitem(last=False)
    except ApiException as e:
        if _terminating(e):
            log.debug("no event %s on %s: namespace %s is being deleted", reason, meta["name"], namespace)
        else:
            log.warning("could not post event %s on %s: %s", reason, meta["name"], e.reason)


def secret_data(name: str, namespace: str) -> dict[str, str] | None:
    """A Secret's decoded data (None when absent); kept in memory only, never logged."""
    import base64

    try:
        secret = client.CoreV1Api(api_client()).read_namespaced_secret(name, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


@functools.cache
def cluster_id() -> str:
    """This cluster's identity: the UID of its kube-system namespace (stable for the cluster's life).

    Backend objects are tagged with it, so two clusters sharing a pool never collect each
    other's volumes."""
    ns = client.CoreV1Api(api_client()).read_namespace("kube-system")
    return str(ns.metadata.uid)


class KubeApi:
    """The API calls the dock makes, as an object it is handed: tests inject a fake one to drive
    error paths fast, production uses this thin pass-through to the module functions."""

    def get(self, plural: str, name: str, namespace: str | None = None) -> Obj | None:
        return get(plural, name, namespace)

    def list_all(self, plural: str, namespace: str | None = None) -> list[Obj]:
        return list_all(plural, namespace)

    def patch_status(self, plural: str, name: str, status: Obj, namespace: str | None = None) -> Obj | None:
        return patch_status(plural, name, status, namespace)

    def post_event(self, obj: Obj, reason: str, message: str, warning: bool = False,
                   component: str = "opensds") -> None:
        post_event(obj, reason, message, warning, component)

    def secret_data(self, name: str, namespace: str) -> dict[str, str] | None:
        return secret_data(name, namespace)

    def remove_finalizer(self, plural: str, name: str, finalizer: str, namespace: str | None = None) -> None:
        remove_finalizer(plural, name, finalizer, namespace)

    def cluster_id(self) -> str:
        return cluster_id()
