"""Pure logic of the CSI controller: names, ids, sizes and pagination."""
from __future__ import annotations

import pytest

from opensds_csi.controller import _paginate, cr_name, make_id, parse_id, requested_size
from opensds_csi.errors import Aborted, OutOfRange
from opensds_csi.proto import csi_pb2

MIB = 1 << 20


def test_provisioner_names_are_used_as_cr_names() -> None:
    assert cr_name("pvc-0d6f0a2e-7d1c-4d7e-9d59-2b3f5c7a1e10") == "pvc-0d6f0a2e-7d1c-4d7e-9d59-2b3f5c7a1e10"


def test_names_that_are_not_dns_labels_are_hashed_stably() -> None:
    odd = "sanity-Controller Service-ABC"
    assert cr_name(odd) == cr_name(odd)
    assert cr_name(odd).startswith("csi-") and len(cr_name(odd)) <= 63
    assert cr_name(odd) != cr_name(odd + "x")


def test_ids_round_trip_and_foreign_ids_resolve_to_nothing() -> None:
    assert parse_id(make_id("opensds-system", "pvc-1")) == ("opensds-system", "pvc-1")
    for foreign in ("reallyfakevolumeid", "a/b/c", "/x", "UPPER/x", ""):
        assert parse_id(foreign) is None


def test_size_rounds_up_to_mib_within_the_limit() -> None:
    assert requested_size(csi_pb2.CapacityRange(required_bytes=MIB + 1)) == 2 * MIB
    assert requested_size(csi_pb2.CapacityRange(required_bytes=MIB + 1, limit_bytes=MIB + 10)) == MIB + 1
    assert requested_size(None) == 1 << 30
    assert requested_size(csi_pb2.CapacityRange(limit_bytes=64 * MIB)) == 64 * MIB


def test_required_above_limit_is_out_of_range() -> None:
    with pytest.raises(OutOfRange):
        requested_size(csi_pb2.CapacityRange(required_bytes=2 * MIB, limit_bytes=MIB))


def _objs(*names: str) -> list[dict[str, object]]:
    return [{"metadata": {"name": n}} for n in names]


def test_pagination_resumes_after_the_next_page_start_was_deleted() -> None:
    page, token = _paginate(_objs("a", "b", "c", "d"), "", 2)  # type: ignore[arg-type]
    assert [p["metadata"]["name"] for p in page] == ["a", "b"] and token
    page, token = _paginate(_objs("a", "b", "d"), token, 2)  # type: ignore[arg-type]
    assert [p["metadata"]["name"] for p in page] == ["d"] and token == ""


def test_tokens_not_issued_by_us_are_aborted() -> None:
    with pytest.raises(Aborted):
        _paginate(_objs("a"), "invalid-token", 0)  # type: ignore[arg-type]


def test_sizes_are_written_as_exact_quantities() -> None:
    from opensds_operator.quantity import exact_quantity, parse_bytes
    for n in (1 << 30, 640 * MIB, MIB + 1, 1000, 3 << 40):
        assert parse_bytes(exact_quantity(n)) == n
    assert exact_quantity(1 << 30) == "1Gi" and exact_quantity(640 * MIB) == "640Mi"
