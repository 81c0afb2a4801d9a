"""Small helpers for integration tests: CR shortcuts over the real apiserver."""
from __future__ import annotations

from typing import Any

from kubernetes import client

from ..testenv import labelled

GROUP, VERSION = "opensds.io", "v1alpha1"


class CRs:
    def __init__(self, api: client.ApiClient, namespace: str | None = None) -> None:
        self.api = client.CustomObjectsApi(api)
        self.namespace = namespace

    def create(self, plural: str, kind: str, name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
        # Labelled as test-made: a later session removes what an interrupted one left (conftest).
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": labelled({"name": name, **meta}),
                "spec": spec}
        if plural in ("storagebackends", "storageprofiles"):
            return self.api.create_cluster_custom_object(GROUP, VERSION, plural, body)  # type: ignore[no-any-return]
        return self.api.create_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, self.namespace, plural, body)

    def get(self, plural: str, name: str) -> dict[str, Any]:
        if plural in ("storagebackends", "storageprofiles"):
            return self.api.get_cluster_custom_object(GROUP, VERSION, plural, name)  # type: ignore[no-any-return]
        return self.api.get_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, self.namespace, plural, name)

    def patch(self, plural: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if plural in ("storagebackends", "storageprofiles"):
            return self.api.patch_cluster_custom_object(  # type: ignore[no-any-return]
                GROUP, VERSION, plural, name, body)
        return self.api.patch_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, self.namespace, plural, name, body)

    def delete(self, plural: str, name: str) -> None:
        if plural in ("storagebackends", "storageprofiles"):
            self.api.delete_cluster_custom_object(GROUP, VERSION, plural, name)
        else:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)

    def delete_if_present(self, plural: str, name: str) -> None:
        """Teardown's delete: an object whose finalizer finished meanwhile is already what we want."""
        try:
            self.delete(plural, name)
        except client.exceptions.ApiException as e:
            if e.status != 404:
                raise

    def exists(self, plural: str, name: str) -> bool:
        try:
            self.get(plural, name)
        except client.exceptions.ApiException as e:
            if e.status == 404:
                return False
            raise
        return True


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions", []):
        if c["type"] == type_:
            return c  # type: ignore[no-any-return]
    return None


def events_for(api: client.ApiClient, namespace: str, name: str) -> list[str]:
    events = client.CoreV1Api(api).list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return [f"{e.reason}: {e.message}" for e in events.items]
