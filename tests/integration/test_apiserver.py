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


# ------------------------------------------------------------ bad input stops at the API (issue 9)

GOOD_BACKEND = {"driver": "ceph", "parameters": {"conf": "/etc/ceph/ceph.conf", "pool": "rbd"}}


def _backend(**parameters: str) -> dict[str, Any]:
    return {**GOOD_BACKEND, "parameters": {**GOOD_BACKEND["parameters"], **parameters}}


@pytest.mark.parametrize(("spec", "message"), [
    (_backend(capacity="lots"), "parameters.capacity must be a positive quantity of at most 1Ei such as 100Gi"),
    (_backend(capacity="-1Gi"), "parameters.capacity must be a positive quantity"),
    (_backend(capacity="8Ei"), "parameters.capacity must be a positive quantity of at most 1Ei"),
    (_backend(cloneDepth="x"), "parameters.cloneDepth must be an integer from 0 to 32"),
    (_backend(cloneDepth="99"), "parameters.cloneDepth must be an integer from 0 to 32"),
    (_backend(cloneDepth="-1"), "parameters.cloneDepth must be an integer from 0 to 32"),
    (_backend(volumeGroup="--x"), "parameters.volumeGroup must be an LVM volume group name"),
    (_backend(volumeGroup=".."), "parameters.volumeGroup must be an LVM volume group name"),
    (_backend(thinPool="-p"), "parameters.thinPool must be an LVM logical volume name"),
    (_backend(pool="--yes-i-really-mean-it"), "parameters.pool must be a pool name"),
    (_backend(user="--id=admin"), "parameters.user must be a Ceph client id"),
    (_backend(path="relative/dir"), "parameters.path must be an absolute path without '..' components"),
    (_backend(path="/srv/../etc"), "parameters.path must be an absolute path without '..' components"),
    (_backend(keyring="/etc/ceph/.."), "parameters.keyring must be an absolute path"),
    (_backend(nvmeofAddresses="x:99999"), "parameters.nvmeofAddresses must be a comma-separated list of "
                                          "<ipv4>:<port> with ports 1..65535"),
    (_backend(nvmeofAddresses="10.0.0.1:99999"), "parameters.nvmeofAddresses must be"),
    (_backend(nvmeofAddresses="10.0.0.1:4420,"), "parameters.nvmeofAddresses must be"),
    (_backend(iscsiPortals="10.0.0.1:0"), "parameters.iscsiPortals must be"),
    (_backend(iscsiPortals="10.0.0.256:3260"), "parameters.iscsiPortals must be"),
    ({**GOOD_BACKEND, "maxOverSubscriptionRatio": 1000},
     "spec.maxOverSubscriptionRatio: Invalid value: 1000: spec.maxOverSubscriptionRatio in body should be less "
     "than or equal to 100"),
    ({"driver": "file", "nodeName": "x/../../tmp/PWNED", "parameters": {"path": "/srv"}},
     "spec.nodeName: Invalid value: \"x/../../tmp/PWNED\": spec.nodeName in body should match"),
])
def test_apiserver_rejects_malformed_backend_parameters(cluster: Cluster, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ApiException) as err:
        _create_cluster_scoped(client.CustomObjectsApi(cluster.api), "storagebackends", "StorageBackend", spec)
    assert err.value.status == 422
    assert message in _message(err)


def test_apiserver_accepts_well_formed_backend_parameters_at_their_bounds(cluster: Cluster) -> None:
    api = client.CustomObjectsApi(cluster.api)
    spec = _backend(capacity="1Ei", cloneDepth="0", volumeGroup="vg_0.data+x", thinPool="thin-pool", user="opensds",
                    keyring="/etc/ceph/ceph.client.opensds.keyring", path="/var/lib/opensds",
                    nvmeofAddresses="127.0.0.1:4420, 10.0.0.5:65535", iscsiPortals="127.0.0.1:1", iscsiOther="")
    created = api.create_cluster_custom_object(GROUP, VERSION, "storagebackends", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "StorageBackend", "metadata": {"generateName": "good-"},
        "spec": {**spec, "maxOverSubscriptionRatio": 100}}, dry_run="All")
    assert created["spec"]["parameters"]["cloneDepth"] == "0"


@pytest.mark.parametrize(("spec", "message"), [
    ({"size": "8Ei", "profile": "p"}, "size must be at most 1Pi"),
    ({"size": "1025Ti", "profile": "p"}, "size must be at most 1Pi"),
    ({"size": "lots", "profile": "p"}, "size must be a positive quantity such as 1Gi"),
    ({"size": "1Gi", "profile": "p", "publishedNodes": ["x/../../tmp/PWNED"]},
     'spec.publishedNodes[0]: Invalid value: "x/../../tmp/PWNED": spec.publishedNodes[0] in body should match'),
    ({"size": "1Gi", "profile": "p", "publishedNodes": ["a" * 254]}, "spec.publishedNodes[0]: Too long"),
    ({"size": "1Gi", "profile": "p", "publishedNodes": [f"n{i}" for i in range(65)]},
     "spec.publishedNodes: Too many: 65: must have at most 64 items"),
    ({"size": "1Gi", "profile": "p", "pool": "--x"}, "spec.pool in body should match"),
    ({"size": "1Gi", "profile": "p", "backend": "../b"}, "spec.backend in body should match"),
    ({"size": "1Gi", "profile": "P/x"}, "spec.profile in body should match"),
    ({"size": "1Gi", "profile": "p", "source": {"kind": "Snapshot", "name": "../s"}},
     "spec.source.name in body should match"),
])
def test_apiserver_rejects_volume_sizes_names_and_nodes_that_could_do_harm(cluster: Cluster, namespace: str,
                                                                           spec: dict[str, Any], message: str) -> None:
    api = client.CustomObjectsApi(cluster.api)
    with pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, "volumes", _volume("bad", **spec))
    assert err.value.status == 422
    assert message in _message(err)


def test_largest_volume_size_is_accepted(cluster: Cluster, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api)
    created = api.create_namespaced_custom_object(GROUP, VERSION, namespace, "volumes",
                                                  _volume("big", size="1Pi", profile="p", publishedNodes=["node-1.x"]),
                                                  dry_run="All")
    assert created["spec"]["size"] == "1Pi"


def test_snapshot_volume_name_must_be_an_object_name(cluster: Cluster, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api)
    with pytest.raises(ApiException) as err:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, "snapshots", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "Snapshot", "metadata": {"name": "s"},
            "spec": {"volumeName": "../v"}})
    assert err.value.status == 422 and "spec.volumeName in body should match" in _message(err)


def test_failure_code_is_kept_in_volume_and_snapshot_status(cluster: Cluster, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api)
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, "volumes", _volume("v", size="1Gi", profile="p"))
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, "snapshots", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Snapshot", "metadata": {"name": "s"}, "spec": {"volumeName": "v"}})
    for plural, name in (("volumes", "v"), ("snapshots", "s")):
        patched = api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, plural, name,
                                                            {"status": {"code": "SourceNotFound"}})
        assert patched["status"]["code"] == "SourceNotFound", f"{plural} status.code was pruned"


def test_profiles_default_to_authenticated_exports(cluster: Cluster) -> None:
    api = client.CustomObjectsApi(cluster.api)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "StorageProfile", "metadata": {"generateName": "auth-"},
            "spec": {"storageType": "block", "accessProtocol": "nvmeof-tcp"}}
    created = api.create_cluster_custom_object(GROUP, VERSION, "storageprofiles", body, dry_run="All")
    assert created["spec"]["unauthenticatedExports"] is False
    with pytest.raises(ApiException) as err:
        api.create_cluster_custom_object(GROUP, VERSION, "storageprofiles", {
            **body, "spec": {**body["spec"], "unauthenticatedExports": "yes"}}, dry_run="All")
    assert err.value.status == 422 and "spec.unauthenticatedExports: Invalid value" in _message(err)
