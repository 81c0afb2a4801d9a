"""LVM state comes from `lvs --reportformat json`: parse it into pool capacity."""
from __future__ import annotations

import json

from opensds_operator.drivers.lvm import parse_lvs, thin_pool_stats


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
