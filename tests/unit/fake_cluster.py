"""An in-memory ClusterApi for the CSI controller's unit and fuzz tests (pure logic, no apiserver).

It stores objects like the apiserver does (uid, resourceVersion, generation bumped on spec
changes, 404/409 as ApiException) and feeds every write into the controller's ObjectStore as
the watch would. `react` plays the operator and dock: given a written object it returns the
status they would record, so a test states an outcome ("SourceNotFound") rather than a sequence.
"""
from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from opensds_csi.store import ObjectStore

Obj = dict[str, Any]
Reaction = Callable[[str, Obj], dict[str, Any] | None]


class FakeContext:
    """The part of grpc.ServicerContext the controller reads."""

    def __init__(self, remaining: float | None = 2.0) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


class FakeClusterApi:
    def __init__(self, store: ObjectStore, react: Reaction | None = None) -> None:
        self.store = store
        self.react = react
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.csi_nodes: dict[str, dict[str, str]] = {}
        self.failures: dict[str, ApiException] = {}  # method name -> raised on every call
        self.calls: list[str] = []
        self._rv = itertools.count(1)

    # ------------------------------------------------------------ test set-up

    def add(self, plural: str, obj: Obj, namespace: str = "") -> Obj:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._rv))
        if namespace:
            meta["namespace"] = namespace
        self.objects[(plural, namespace, meta["name"])] = obj
        if namespace == self.store.namespace and plural in ObjectStore.PLURALS:
            self.store.put(plural, copy.deepcopy(obj))
        return obj

    def set_status(self, plural: str, name: str, namespace: str, status: dict[str, Any]) -> None:
        obj = self.objects[(plural, namespace, name)]
        obj["status"] = {**(obj.get("status") or {}), **status}
        self.add(plural, obj, namespace)

    def _check(self, method: str) -> None:
        self.calls.append(method)
        if method in self.failures:
            raise self.failures[method]

    def _reacted(self, plural: str, obj: Obj, namespace: str) -> Obj:
        status = self.react(plural, copy.deepcopy(obj)) if self.react else None
        if status is not None:
            self.set_status(plural, obj["metadata"]["name"], namespace, status)
        return obj

    # ------------------------------------------------------------ ClusterApi

    def get(self, plural: str, name: str, namespace: str | None = None) -> Obj | None:
        self._check("get")
        found = self.objects.get((plural, namespace or "", name))
        return copy.deepcopy(found) if found else None

    def list(self, plural: str) -> list[Obj]:
        self._check("list")
        return [copy.deepcopy(o) for (p, _, _), o in sorted(self.objects.items()) if p == plural]

    def create(self, plural: str, body: Obj, namespace: str) -> Obj:
        self._check("create")
        name = body["metadata"]["name"]
        if (plural, namespace, name) in self.objects:
            raise ApiException(status=409, reason="Conflict")
        obj = self.add(plural, copy.deepcopy(body), namespace)
        created = copy.deepcopy(obj)
        self._reacted(plural, obj, namespace)
        return created

    def patch(self, plural: str, name: str, body: Obj, namespace: str) -> Obj:
        self._check("patch")
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            raise ApiException(status=404, reason="Not Found")
        wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != obj["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        if "spec" in body:
            obj["spec"] = {**obj["spec"], **body["spec"]}
            obj["metadata"]["generation"] += 1
        self.add(plural, obj, namespace)
        patched = copy.deepcopy(obj)
        self._reacted(plural, obj, namespace)
        return patched

    def delete(self, plural: str, name: str, namespace: str) -> bool:
        self._check("delete")
        obj = self.objects.pop((plural, namespace, name), None)
        if obj is None:
            return False
        if namespace == self.store.namespace and plural in ObjectStore.PLURALS:
            self.store._apply(plural, "DELETED", obj)
        return True

    def csi_node_ids(self, node: str) -> dict[str, str] | None:
        self._check("csi_node_ids")
        return self.csi_nodes.get(node)
