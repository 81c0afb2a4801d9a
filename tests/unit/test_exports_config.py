"""Which exports a backend offers, from its parameters, and the identities both ends derive."""
from __future__ import annotations

import pytest

from opensds_operator.drivers.base import PermanentDriverError
from opensds_operator.exports import make_exporters, parse_addresses
from opensds_operator.exports.base import node_host_nqn, node_iqn, volume_iqn, volume_nqn


def test_addresses_parse_and_bad_ones_say_what_is_wrong() -> None:
    assert parse_addresses("10.0.0.5:4420, 10.0.1.5:4420") == [("10.0.0.5", 4420), ("10.0.1.5", 4420)]
    with pytest.raises(PermanentDriverError, match=r"10\.0\.0\.5. is not"):
        parse_addresses("10.0.0.5")


def test_backends_offer_only_the_protocols_they_are_configured_for() -> None:
    assert make_exporters({"parameters": {}}) == {}
    exporters = make_exporters({"parameters": {"nvmeofAddresses": "127.0.0.1:4420", "iscsiPortals": "127.0.0.1:3260"}})
    assert sorted(exporters) == ["iscsi", "nvmeof-tcp"]


def test_node_and_volume_identities_are_stable_names() -> None:
    assert node_host_nqn("node-1") == "nqn.2024-11.io.opensds:node:node-1"
    assert node_iqn("node-1") == "iqn.2024-11.io.opensds:node:node-1"
    assert volume_nqn("vol-x") == "nqn.2024-11.io.opensds:vol-x"
    assert volume_iqn("vol-x") == "iqn.2024-11.io.opensds:vol-x"
