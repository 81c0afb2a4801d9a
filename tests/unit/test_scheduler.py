"""Every scheduler filter refuses what it should and explains why; weighers order the rest."""
from __future__ import annotations

from dataclasses import replace

from opensds_operator.quantity import GiB
from opensds_operator.scheduler import (
    Capabilities,
    Pool,
    Request,
    pools_from_backend,
    request_for,
    schedule,
)

CAPS = Capabilities(
    storage_types=frozenset({"block"}), thin=True, thick=True, snapshot=True, clone=True,
    multi_attach=False, protocols=frozenset({"local", "iscsi"}), custom={"tier": "gold"},
)


def pool(name: str = "p", backend: str = "b", **kw: object) -> Pool:
    base = Pool(backend=backend, name=name, ready=True, total_bytes=100 * GiB, free_bytes=100 * GiB,
                provisioned_bytes=0, capabilities=CAPS, topology={"zone": "a"})
    return replace(base, **kw)  # type: ignore[arg-type]


def refusal(request: Request, p: Pool, committed: int = 0) -> str:
    decision = schedule(request, [p], {p.key: committed})
    assert decision.pool is None
    return decision.rejections[p.label]


def test_fitting_pool_is_chosen_with_no_rejections() -> None:
    decision = schedule(Request(size_bytes=GiB), [pool()], {})
    assert decision.pool is not None and decision.pool.name == "p"
    assert decision.rejections == {}


def test_not_ready_backend_is_refused() -> None:
    assert refusal(Request(GiB), pool(ready=False)) == "backend not Ready"


def test_pinned_backend_and_pool_are_respected() -> None:
    assert "pinned to backend other" in refusal(Request(GiB, pinned_backend="other"), pool())
    assert "pinned to pool q" in refusal(Request(GiB, pinned_pool="q"), pool())


def test_clone_must_land_in_its_source_pool() -> None:
    assert "source lives in b/q" in refusal(Request(GiB, source_pool=("b", "q")), pool())


def test_storage_type_filter() -> None:
    assert "storage type file not offered" in refusal(Request(GiB, storage_type="file", protocol="local"), pool())


def test_protocol_filter_lists_what_is_offered() -> None:
    assert refusal(Request(GiB, protocol="nvmeof-tcp"), pool()) == (
        "protocol nvmeof-tcp not offered (offers iscsi, local)")


def test_thin_and_thick_filters() -> None:
    thick_only = pool(capabilities=replace(CAPS, thin=False))
    thin_only = pool(capabilities=replace(CAPS, thick=False))
    assert refusal(Request(GiB, provisioning="thin"), thick_only) == "thin provisioning not supported"
    assert refusal(Request(GiB, provisioning="thick"), thin_only) == "thick provisioning not supported"


def test_multi_attach_filter() -> None:
    assert refusal(Request(GiB, multi_attach=True), pool()) == "multi-attach not supported"


def test_custom_properties_must_match_pool_capabilities() -> None:
    assert refusal(Request(GiB, custom_properties={"tier": "silver"}), pool()) == (
        "capability tier=silver required, pool has tier=gold")
    assert "encrypted=<unset>" in refusal(Request(GiB, custom_properties={"encrypted": "true"}), pool())


def test_requisite_and_allowed_topology() -> None:
    assert "requisite topology" in refusal(Request(GiB, requisite_topology=[{"zone": "b"}]), pool())
    assert "allowed topology" in refusal(Request(GiB, allowed_topology=[{"zone": "b"}]), pool())
    ok = schedule(Request(GiB, requisite_topology=[{"zone": "b"}, {"zone": "a"}]), [pool()], {})
    assert ok.pool is not None


def test_capacity_counts_committed_bytes_and_over_subscription() -> None:
    assert "insufficient capacity" in refusal(Request(10 * GiB), pool(), committed=95 * GiB)
    oversubscribed = pool(over_subscription_ratio=2.0)
    assert schedule(Request(10 * GiB), [oversubscribed], {oversubscribed.key: 150 * GiB}).pool is not None
    assert "over-subscription ratio 2" in refusal(Request(60 * GiB), oversubscribed, committed=150 * GiB)


def test_thick_volumes_ignore_over_subscription_and_need_free_space() -> None:
    p = pool(over_subscription_ratio=4.0, free_bytes=5 * GiB)
    assert "insufficient free space for a thick volume" in refusal(Request(10 * GiB, provisioning="thick"), p)


def test_max_volume_size() -> None:
    p = pool(capabilities=replace(CAPS, max_volume_bytes=4 * GiB))
    assert "exceeds the pool's max volume size 4Gi" in refusal(Request(5 * GiB), p)


def test_status_provisioned_bytes_count_when_larger_than_known_placements() -> None:
    assert "insufficient capacity" in refusal(Request(10 * GiB), pool(provisioned_bytes=95 * GiB))


def test_free_space_weigher_prefers_emptier_pool() -> None:
    a, b = pool("a"), pool("b")
    decision = schedule(Request(GiB), [a, b], {a.key: 50 * GiB, b.key: 10 * GiB})
    assert decision.pool is not None and decision.pool.name == "b"


def test_preferred_topology_outweighs_free_space() -> None:
    a, b = pool("a", topology={"zone": "a"}), pool("b", topology={"zone": "b"})
    decision = schedule(Request(GiB, preferred_topology=[{"zone": "a"}]), [a, b], {a.key: 50 * GiB})
    assert decision.pool is not None and decision.pool.name == "a"


def test_explanation_lists_every_pool_and_reason() -> None:
    decision = schedule(Request(GiB, protocol="nvmeof-tcp"), [pool("x"), pool("y", ready=False)], {})
    assert decision.explain() == (
        "b/x: protocol nvmeof-tcp not offered (offers iscsi, local); b/y: backend not Ready")
    assert schedule(Request(GiB), [], {}).explain() == "no StorageBackend reports any pool"


def test_pools_and_request_are_read_from_api_objects() -> None:
    backend = {
        "metadata": {"name": "node1-file"},
        "spec": {"driver": "file", "topology": {"zone": "a"}, "maxOverSubscriptionRatio": 3},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "pools": [{"name": "default", "totalBytes": 10, "freeBytes": 8, "provisionedBytes": 2,
                       "capabilities": {"thin": True, "protocols": ["local"], "storageTypes": ["block"]}}],
        },
    }
    [p] = pools_from_backend(backend)
    assert (p.ready, p.topology, p.over_subscription_ratio, p.capabilities.thin) == (True, {"zone": "a"}, 3.0, True)
    r = request_for({"accessibilityRequirements": {"requisite": [{"zone": "a"}]}},
                    {"storageType": "block", "accessProtocol": "local",
                     "provisioning": {"type": "thick", "multiAttach": True}, "customProperties": {"k": "v"}}, 5)
    assert (r.provisioning, r.multi_attach, r.custom_properties, r.requisite_topology) == (
        "thick", True, {"k": "v"}, [{"zone": "a"}])


def test_backend_whose_dock_stopped_reporting_is_refused() -> None:
    fresh, stale = pool("fresh", last_probe=1000.0), pool("stale", last_probe=800.0)
    decision = schedule(Request(GiB, at=1050.0), [fresh, stale], {})
    assert decision.pool is not None and decision.pool.name == "fresh"
    assert decision.rejections == {
        "b/stale": "capacity report is stale (last 250s ago); is the backend's dock running?"}
    assert "(last never)" in refusal(Request(GiB, at=1.0), pool(last_probe=None))


def test_staleness_window_follows_the_backends_report_interval() -> None:
    backend = {"metadata": {"name": "b"}, "spec": {"capacityReportIntervalSeconds": 5},
               "status": {"lastProbeTime": "2026-01-01T00:00:00Z", "pools": [{"name": "p"}]}}
    [p] = pools_from_backend(backend)
    assert p.stale_after == 25 and p.last_probe == 1767225600.0


def test_node_local_volumes_are_confined_to_the_backend_node() -> None:
    local = pool(node="node-1")
    on_node = [{"topology.block.csi.opensds.io/node": "node-1"}]
    elsewhere = [{"topology.block.csi.opensds.io/node": "node-2"}]
    assert schedule(Request(size_bytes=GiB, requisite_topology=on_node), [local], {}).pool is not None
    assert "outside the requisite topology" in refusal(Request(size_bytes=GiB, requisite_topology=elsewhere), local)
    # a network protocol reaches any node: the node key does not constrain it
    assert schedule(Request(size_bytes=GiB, protocol="iscsi", requisite_topology=elsewhere), [local],
                    {}).pool is not None
    assert local.topology_for("iscsi") == {"zone": "a"}
    assert local.topology_for("local") == {"zone": "a", "topology.block.csi.opensds.io/node": "node-1"}
