"""The Kubernetes API as the CSI controller uses it: one small protocol, injected.

The controller's error paths (a missing source, a 403, a conflict, a failure code on a CR)
are decided from what these few calls return; with the protocol injected, unit and fuzz
tests drive them with an in-memory fake in milliseconds instead of an apiserver. The real
implementation puts a timeout on every request, so a hung connection costs one CSI call a
bounded wait instead of a worker thread forever.
"""
from __future__ import annotations

from typing import Any, Protocol

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from opensds_operator import kube
from opensds_operator.api import GROUP, VERSION

Obj = dict[str, Any]
REQUEST_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds per API request


class ClusterApi(Protocol):
    """Reads and writes of our CRs plus the CSINode lookup; errors are ApiException as the client raises them."""

    def get(self, plural: str, name: str, namespace: str | None = None) -> Obj | None:
        """The object, or None when it does not exist (404)."""

    def list(self, plural: str) -> list[Obj]:
        """Every object of a cluster-scoped resource."""

    def create(self, plural: str, body: Obj, namespace: str) -> Obj: ...

    def patch(self, plural: str, name: str, body: Obj, namespace: str) -> Obj:
        """A merge patch (a resourceVersion in the body makes it conditional: 409 on conflict)."""

    def delete(self, plural: str, name: str, namespace: str) -> bool:
        """Request deletion; False when it is already gone."""

    def csi_node_ids(self, node: str) -> dict[str, str] | None:
        """driver name -> node id from the node's CSINode; None when the node has none."""


class KubeClusterApi:
    """ClusterApi over the kubernetes client, every request with REQUEST_TIMEOUT."""

    def __init__(self, timeout: tuple[float, float] = REQUEST_TIMEOUT) -> None:
        self.timeout = timeout

    def get(self, plural: str, name: str, namespace: str | None = None) -> Obj | None:
        try:
            if namespace:
                obj: Obj = kube.custom().get_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, name, _request_timeout=self.timeout)
            else:
                obj = kube.custom().get_cluster_custom_object(GROUP, VERSION, plural, name,
                                                              _request_timeout=self.timeout)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return obj

    def list(self, plural: str) -> list[Obj]:
        result = kube.custom().list_cluster_custom_object(GROUP, VERSION, plural, _request_timeout=self.timeout)
        items: list[Obj] = result.get("items", [])
        return items

    def create(self, plural: str, body: Obj, namespace: str) -> Obj:
        obj: Obj = kube.custom().create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body,
                                                                 _request_timeout=self.timeout)
        return obj

    def patch(self, plural: str, name: str, body: Obj, namespace: str) -> Obj:
        obj: Obj = kube.custom().patch_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, body,
                                                                _request_timeout=self.timeout)
        return obj

    def delete(self, plural: str, name: str, namespace: str) -> bool:
        try:
            kube.custom().delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name,
                                                          _request_timeout=self.timeout)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    def csi_node_ids(self, node: str) -> dict[str, str] | None:
        try:
            csinode = client.StorageV1Api(kube.api_client()).read_csi_node(node, _request_timeout=self.timeout)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return {d.name: d.node_id for d in (csinode.spec.drivers or [])}
