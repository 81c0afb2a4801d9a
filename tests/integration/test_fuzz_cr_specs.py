"""Fuzz: random Volume, StorageBackend and StorageProfile specs against the real kube-apiserver.

Every spec is either accepted or refused 422 with a message (never a 500 or a crash of a CEL
rule), and what the API accepts the code can digest: an accepted Volume's size parses and
schedules, an accepted backend's parameters pass make_driver's own checks and its exporters
parse. Server-side dry runs: nothing is stored, so the run stays a few seconds.
"""
from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from opensds_operator.api import MAX_VOLUME_BYTES
from opensds_operator.drivers import check_parameters
from opensds_operator.exports import make_exporters
from opensds_operator.quantity import exact_quantity, parse_bytes
from opensds_operator.scheduler import pools_from_backend, request_for, schedule

from .conftest import Cluster

GROUP, VERSION = "opensds.io", "v1alpha1"
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
dns = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True)
names = st.one_of(dns, dns, st.sampled_from(["x/../../tmp/PWNED", "--x", "-", "..", "UPPER", "a" * 254, ""]), text)
lvm_names = st.one_of(st.from_regex(r"[A-Za-z0-9_.+-]{1,12}", fullmatch=True), names)
quantities = st.one_of(
    st.from_regex(r"[1-9][0-9]{0,3}(Ki|Mi|Gi|Ti)?", fullmatch=True),
    st.from_regex(r"[+-]?[0-9]{0,22}(\.[0-9]{0,4})?(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]{1,3})?",
                  fullmatch=True),
    st.sampled_from(["1Gi", "1Pi", "1025Ti", "8Ei", "lots", "0", "Infinity", "1e1000000", "0.5", "1n"]), text)
octet = st.integers(0, 300).map(str)
addresses = st.one_of(
    st.lists(st.builds(lambda a, b, c, d, port: f"{a}.{b}.{c}.{d}:{port}", octet, octet, octet, octet,
                       st.integers(-1, 100000)), min_size=1, max_size=3).map(", ".join),
    st.sampled_from(["x:99999", "127.0.0.1:4420", "", ",", "[::1]:4420", "127.0.0.1:4420,"]), text)
int64 = st.integers(-(2**63), 2**63 - 1)
PARAMETER_VALUES: dict[str, st.SearchStrategy[str]] = {
    "capacity": quantities,
    "cloneDepth": st.one_of(st.integers(-5, 100).map(str), text),
    "volumeGroup": lvm_names, "thinPool": lvm_names, "pool": lvm_names, "user": lvm_names,
    "path": st.one_of(st.sampled_from(["/srv/x", "/srv/../etc", "rel", "/a/..", "/"]),
                      st.from_regex(r"/[-a-z0-9_./]{0,20}", fullmatch=True), text),
    "conf": st.one_of(st.just("/etc/ceph/ceph.conf"), text),
    "keyring": st.one_of(st.from_regex(r"/[-a-z0-9_./]{0,20}", fullmatch=True), text),
    "nvmeofAddresses": addresses, "iscsiPortals": addresses,
}


@st.composite
def backend_specs(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(PARAMETER_VALUES)), max_size=5, unique=True))
    params = {k: draw(PARAMETER_VALUES[k]) for k in keys} | draw(st.dictionaries(text, text, max_size=1))
    # Mostly well-formed around the parameters, so most examples reach the parameter rules.
    driver = draw(st.sampled_from(["file", "lvm", "ceph", "nfs"])) if draw(st.integers(0, 9)) else draw(text)
    spec: dict[str, Any] = {"driver": driver, "parameters": params}
    if draw(st.integers(0, 9)):
        spec["nodeName"] = draw(dns) if draw(st.integers(0, 4)) else draw(names)
    if draw(st.booleans()):
        spec["maxOverSubscriptionRatio"] = draw(st.one_of(
            st.floats(-10, 1e6, allow_nan=False, allow_infinity=False), st.floats(1, 100), st.integers(-10, 10**6)))
    if draw(st.booleans()):
        spec["capacityReportIntervalSeconds"] = draw(st.one_of(st.integers(5, 3600), st.integers(-10, 10**5)))
    if draw(st.booleans()):
        spec["topology"] = draw(st.dictionaries(text, text, max_size=3))
    return spec


@st.composite
def volume_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"size": draw(quantities), "profile": draw(names)}
    for field in ("backend", "pool"):
        if draw(st.booleans()):
            spec[field] = draw(names)
    if draw(st.booleans()):
        spec["publishedNodes"] = draw(st.lists(names, max_size=4, unique=True))
    if draw(st.booleans()):
        spec["source"] = {"kind": draw(st.sampled_from(["Snapshot", "Volume", "Pod"])), "name": draw(names)}
    if draw(st.booleans()):
        segments = st.lists(st.dictionaries(text, text, max_size=2), max_size=2)
        spec["accessibilityRequirements"] = {"requisite": draw(segments), "preferred": draw(segments)}
    if draw(st.booleans()):
        spec["reclaimPolicy"] = draw(st.one_of(st.sampled_from(["Delete", "Retain"]), text))
    return spec


@st.composite
def profile_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "storageType": draw(st.one_of(st.sampled_from(["block", "file"]), st.just("block"), text)),
        "accessProtocol": draw(st.one_of(st.sampled_from(["nvmeof-tcp", "iscsi", "rbd", "local", "nfs"]), text)),
    }
    if draw(st.booleans()):
        spec["provisioning"] = {"type": draw(st.sampled_from(["thin", "thick", "x"])),
                                "maxIOPS": draw(st.one_of(st.integers(1, 10**6), int64)),
                                "multiAttach": draw(st.booleans())}
    if draw(st.booleans()):
        spec["unauthenticatedExports"] = draw(st.one_of(st.booleans(), st.booleans(), text))
    if draw(st.booleans()):
        spec["nodeStageSecretRef"] = {"name": draw(names), "namespace": draw(names)}
    if draw(st.booleans()):
        spec["customProperties"] = draw(st.dictionaries(text, text, max_size=3))
    return spec


def _dry_run_create(cluster: Cluster, plural: str, kind: str, spec: dict[str, Any],
                    namespace: str | None = None) -> dict[str, Any] | None:
    """The object the API would store, or None after a 422 with a message; anything else fails."""
    api = client.CustomObjectsApi(cluster.api)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"generateName": "fuzz-"}, "spec": spec}
    try:
        if namespace:
            obj: dict[str, Any] = api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body,
                                                                      dry_run="All")
        else:
            obj = api.create_cluster_custom_object(GROUP, VERSION, plural, body, dry_run="All")
    except ApiException as e:
        assert e.status == 422, f"{kind} spec {spec!r}: HTTP {e.status}: {e.body}"
        assert json.loads(e.body)["message"], f"{kind} spec {spec!r} refused without a message"
        return None
    return obj


@FUZZ
@given(spec=volume_specs())
def test_every_volume_spec_is_accepted_and_schedulable_or_refused_with_a_message(
        cluster: Cluster, namespace: str, spec: dict[str, Any]) -> None:
    obj = _dry_run_create(cluster, "volumes", "Volume", spec, namespace)
    if obj is None:
        return
    size = parse_bytes(obj["spec"]["size"])
    assert 0 < size <= MAX_VOLUME_BYTES, f"accepted size {obj['spec']['size']!r} is {size} bytes"
    assert parse_bytes(exact_quantity(size)) == size
    decision = schedule(request_for(obj["spec"], {}, size), [], {})
    assert decision.pool is None and decision.explain()


@FUZZ
@given(spec=backend_specs())
def test_every_backend_spec_the_api_accepts_passes_the_dock_checks(cluster: Cluster, spec: dict[str, Any]) -> None:
    obj = _dry_run_create(cluster, "storagebackends", "StorageBackend", spec)
    if obj is None:
        return
    params = obj["spec"].get("parameters") or {}
    check_parameters(params)  # the CRD and make_driver agree: no PermanentDriverError for an accepted spec
    make_exporters(obj["spec"])
    pools_from_backend({**obj, "status": {"pools": [{"name": "p", "totalBytes": 1}]}})


@FUZZ
@given(spec=profile_specs())
def test_every_profile_spec_is_accepted_or_refused_with_a_message(cluster: Cluster, spec: dict[str, Any]) -> None:
    obj = _dry_run_create(cluster, "storageprofiles", "StorageProfile", spec)
    if obj is not None:
        assert isinstance(obj["spec"]["unauthenticatedExports"], bool)
