"""The control plane the tests use is a real kube-apiserver enforcing our CRD schemas."""
from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .conftest import Cluster

GROUP, VERSION = "opensds.io", "v1alpha1"


def _volume(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Volume", "metadata": {"name": name}, "spec": spec}


def _message(err: pytest.ExceptionInfo[ApiException]) -> str:
    return str(json.loads(err.value.body)["message"])


def test_readyz_reports_ok(cluster: Cluster) -> None:
    assert cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_apiserver_rejects_object_violating_crd_schema(cluster: Cluster, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api)
    with pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, "volumes", _volume("bad", size="1Gi"))
    assert err.value.status == 422
    assert _message(err).startswith('Volume.opensds.io "bad" is invalid: [spec.profile: Required value')


def test_apiserver_rejects_cel_violations_with_our_messages(cluster: Cluster, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api)
    with pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "volumes", _volume("neg", size="-1Gi", profile="p")
        )
    assert "size must be a positive quantity such as 1Gi" in _message(err)

    api.create_namespaced_custom_object(GROUP, VERSION, namespace, "volumes", _volume("v", size="2Gi", profile="p"))
    with pytest.raises(ApiException) as err:
        api.patch_namespaced_custom_object(GROUP, VERSION, namespace, "volumes", "v", {"spec": {"size": "1Gi"}})
    assert err.value.status == 422
    assert "size can only grow (volumes cannot be shrunk)" in _message(err)


def test_snapshot_crds_from_pinned_external_snapshotter_are_served(cluster: Cluster) -> None:
    out = cluster.kubectl("api-resources", "--api-group=snapshot.storage.k8s.io", "-o", "name").stdout.split()
    assert {"volumesnapshots.snapshot.storage.k8s.io", "volumesnapshotclasses.snapshot.storage.k8s.io"} <= set(out)


def _create_cluster_scoped(api: client.CustomObjectsApi, plural: str, kind: str, spec: dict[str, Any]) -> None:
    api.create_cluster_custom_object(GROUP, VERSION, plural, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"generateName": "bad-"}, "spec": spec})


@pytest.mark.parametrize(("plural", "kind", "spec", "message"), [
    ("storagebackends", "StorageBackend", {"driver": "foo", "nodeName": "n"},
     'spec.driver: Unsupported value: "foo": supported values: "file", "lvm", "ceph", "nfs"'),
    ("storagebackends", "StorageBackend", {"driver": "file"},
     "node-local drivers (file, lvm) need spec.nodeName"),
    ("storageprofiles", "StorageProfile", {"storageType": "file", "accessProtocol": "iscsi"},
     "file profiles use accessProtocol nfs"),
    ("storageprofiles", "StorageProfile",
     {"storageType": "block", "accessProtocol": "iscsi", "provisioning": {"maxIOPS": 0}},
     "spec.provisioning.maxIOPS: Invalid value: 0: spec.provisioning.maxIOPS in body should be greater than or "
     "equal to 1"),
    ("storageprofiles", "StorageProfile",
     {"storageType": "block", "accessProtocol": "local", "provisioning": {"multiAttach": True}},
     "multiAttach is not possible with accessProtocol local"),
])
def test_apiserver_rejects_bad_backends_and_profiles(cluster: Cluster, plural: str, kind: str,
                                                     spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ApiException) as err:
        _create_cluster_scoped(client.CustomObjectsApi(cluster.api), plural, kind, spec)
    assert err.value.status == 422
    assert message in _message(err)


def test_placement_and_profile_are_immutable(cluster: Cluster, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api)
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, "volumes",
                                        _volume("pinned", size="1Mi", profile="p", backend="b", pool="x"))
    for change, message in (({"profile": "q"}, "profile is immutable"),
                            ({"backend": "c"}, "backend is immutable once set"),
                            ({"pool": "y"}, "pool is immutable once set")):
        with pytest.raises(ApiException) as err:
            api.patch_namespaced_custom_object(GROUP, VERSION, namespace, "volumes", "pinned", {"spec": change})
        assert message in _message(err)
