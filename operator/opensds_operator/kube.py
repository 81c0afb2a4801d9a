"""Thin helpers over the kubernetes client for our custom resources and Events."""
from __future__ import annotations

import functools
import logging
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


def post_event(obj: Obj, reason: str, message: str, warning: bool = False, component: str = "opensds") -> None:
    """Record an Event on `obj` (best effort: a failed Event must not fail a reconcile)."""
    meta = obj["metadata"]
    namespace = meta.get("namespace") or "default"
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
        message=message[:1024],
        type="Warning" if warning else "Normal",
        first_timestamp=now(),
        last_timestamp=now(),
        count=1,
        source=client.V1EventSource(component=component),
        reporting_component=component,
    )
    try:
        client.CoreV1Api(api_client()).create_namespaced_event(namespace, event)
    except ApiException as e:
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
