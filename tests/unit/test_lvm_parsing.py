"""LVM state comes from `lvs --reportformat json`: parse it into pool capacity."""
from __future__ import annotations

import json
import re

import pytest

from opensds_operator.drivers.base import Owner, PermanentDriverError
from opensds_operator.drivers.lvm import (
    LvmDriver,
    owner_from_tags,
    owner_tags,
    parse_lvs,
    parse_tags,
    quarantined_at,
    thin_pool_stats,
)


def lv(name: str, size: int, percent: str, pool: str, attr: str) -> dict[str, str]:
    return {"lv_name": name, "lv_size": str(size), "data_percent": percent, "pool_lv": pool, "lv_attr": attr}


LVS = json.dumps({"report": [{"lv": [
    lv("thinpool", 2**30, "25.00", "", "twi-aotz--"),
    lv("vol-a", 2**29, "10.00", "thinpool", "Vwi-a-tz--"),
    lv("vol-b", 2**31, "0.00", "thinpool", "Vwi-a-tz--"),
    lv("snap-c", 2**29, "10.00", "thinpool", "Vwi---tz-k"),
]}]})


def test_thin_pool_capacity_from_lvs_json() -> None:
    total, free, provisioned = thin_pool_stats(parse_lvs(LVS), "thinpool")
    assert total == 2**30
    assert free == 2**30 - 2**28
    assert provisioned == 2**29 + 2**31  # volumes only: snapshots share their origin's blocks


OWNER = Owner("0b5e7c1e-cluster", "lvm-a", "Volume", "team-a", "data-0", "3f2a", retained=False)
LVM_TAG = re.compile(r"[A-Za-z0-9_+./=!:&#-]{1,1024}")  # lvm(8): the characters a tag may hold


def test_owner_tags_use_only_lvm_tag_characters_and_round_trip() -> None:
    odd = Owner("c", "b", "Snapshot", "ns", "we ird,na/me=é", "uid-1")  # not a Kubernetes name: hex-encoded
    for owner in (OWNER, odd):
        tags = owner_tags(owner)
        assert all(LVM_TAG.fullmatch(t) and not t.startswith("-") for t in tags), tags
        assert owner_from_tags(f"vol-{owner.uid}", ",".join(tags)) == owner
    assert "opensds.cluster=0b5e7c1e-cluster" in owner_tags(OWNER)
    longest = Owner("c" * 36, "b" * 253, "Volume", "n" * 63, "m" * 253, "u" * 36)  # Kubernetes' longest names
    assert all(len(t) <= 1024 for t in owner_tags(longest))
    with pytest.raises(PermanentDriverError, match="1024"):  # never a silently cut tag
        owner_tags(Owner("c", "b", "Volume", "ns", "é" * 253, "u"))


def test_lv_tags_column_parses_into_owner_and_quarantine_time() -> None:
    tags = ",".join([*owner_tags(OWNER), "backup-nightly", "opensds.quarantined=1764000000"])
    assert owner_from_tags("vol-3f2a", tags) == OWNER
    assert quarantined_at(tags) == 1764000000.0
    assert quarantined_at(",".join(owner_tags(OWNER))) is None
    retained = ",".join(owner_tags(Owner(*[getattr(OWNER, f) for f in ("cluster", "backend", "kind", "namespace",
                                                                        "name", "uid")], retained=True)))
    assert owner_from_tags("vol-3f2a", retained).retained  # type: ignore[union-attr]


def test_missing_contradictory_or_inherited_tags_are_no_owner() -> None:
    tags = owner_tags(OWNER)
    assert owner_from_tags("vol-3f2a", "") is None
    assert owner_from_tags("vol-3f2a", ",".join(tags[:-2])) is None  # incomplete
    assert owner_from_tags("vol-3f2a", ",".join([*tags, "opensds.uid=other"])) is None  # two values for one field
    # a snapshot carrying its origin's tags is not owned by the origin's CR
    assert owner_from_tags("snap-9999", ",".join(tags)) is None
    assert parse_tags("foo,opensds.kind=Volume, opensds.kind=Snapshot") == {"kind": ["Volume", "Snapshot"]}


def test_lvs_json_with_tags_and_quarantined_lvs() -> None:
    rows = parse_lvs(json.dumps({"report": [{"lv": [
        lv("thinpool", 2**30, "25.00", "", "twi-aotz--"),
        {**lv("vol-3f2a", 2**29, "1.00", "thinpool", "Vwi-a-tz--"), "lv_tags": ",".join(owner_tags(OWNER))},
        {**lv("quarantine-vol-3f2a", 2**29, "1.00", "thinpool", "Vwi-a-tz--"), "lv_tags": ""},
    ]}]}))
    total, _free, provisioned = thin_pool_stats(rows, "thinpool")
    assert (total, provisioned) == (2**30, 2**29)  # a quarantined LV is not provisioned to anyone


def test_lv_names_that_would_be_read_as_options_are_refused() -> None:
    with pytest.raises(PermanentDriverError, match="not a usable LV name"):
        LvmDriver("--x", "thinpool")
    with pytest.raises(PermanentDriverError, match="not a usable LV name"):
        LvmDriver("vg", "thin pool")
