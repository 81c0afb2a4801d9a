"""Malformed StorageBackend parameters stop at make_driver/make_exporters with a message naming
the parameter (PermanentDriverError: a condition + Event), never a ValueError or a traceback.

The CRD rejects the same values at the API (tests/integration/test_apiserver.py); these cover
objects stored before a rule existed."""
from __future__ import annotations

from pathlib import Path

import pytest

from opensds_operator.drivers import make_driver
from opensds_operator.drivers.base import PermanentDriverError
from opensds_operator.exports import make_exporters, parse_addresses
from opensds_operator.quantity import parse_bytes


@pytest.mark.parametrize(("params", "message"), [
    ({"capacity": "lots"}, r"parameters\.capacity 'lots' must be a positive quantity"),
    ({"capacity": "-1Gi"}, r"parameters\.capacity"),
    ({"capacity": "8Ei"}, r"at most 1Ei"),
    ({"capacity": "Infinity"}, r"parameters\.capacity"),
    ({"capacity": "1e1000000"}, r"parameters\.capacity"),
    ({"pool": "--x"}, r"parameters\.pool '--x' is not a pool name"),
    ({"path": "relative/dir"}, r"parameters\.path .* must be an absolute path"),
    ({"path": "/srv/../etc"}, r"without '\.\.' components"),
    ({"path": "/srv/x\n[global]"}, r"parameters\.path must not contain control characters"),
])
def test_file_backend_with_a_malformed_parameter_is_a_permanent_error(tmp_path: Path, params: dict[str, str],
                                                                      message: str) -> None:
    with pytest.raises(PermanentDriverError, match=message):
        make_driver({"driver": "file", "parameters": {"path": str(tmp_path), **params}})


@pytest.mark.parametrize(("params", "message"), [
    ({"volumeGroup": "--x"}, r"parameters\.volumeGroup '--x' is not an LVM volume group name"),
    ({"volumeGroup": "-"}, r"volumeGroup"),
    ({"volumeGroup": "vg", "thinPool": "-p"}, r"parameters\.thinPool '-p' is not an LVM logical volume name"),
    ({"volumeGroup": "vg/../x"}, r"volumeGroup"),
    ({"volumeGroup": ".."}, r"volumeGroup"),
])
def test_lvm_names_that_would_be_options_or_paths_are_refused(params: dict[str, str], message: str) -> None:
    with pytest.raises(PermanentDriverError, match=message):
        make_driver({"driver": "lvm", "parameters": params})


@pytest.mark.parametrize(("params", "message"), [
    ({"cloneDepth": "x"}, r"parameters\.cloneDepth 'x' must be an integer from 0 to 32"),
    ({"cloneDepth": "-1"}, r"cloneDepth"),
    ({"cloneDepth": "33"}, r"cloneDepth"),
    ({"cloneDepth": "\u0663"}, r"cloneDepth"),  # a digit to str.isdigit, not to int() callers expect
    ({"user": "--id=admin"}, r"parameters\.user"),
    ({"conf": "ceph.conf"}, r"parameters\.conf"),
    ({"keyring": "../k"}, r"parameters\.keyring"),
])
def test_ceph_backend_with_a_malformed_parameter_fails_before_connecting(params: dict[str, str],
                                                                        message: str) -> None:
    with pytest.raises(PermanentDriverError, match=message):
        make_driver({"driver": "ceph", "parameters": {"conf": "/etc/ceph/ceph.conf", "pool": "rbd", **params}})


def test_parameters_that_are_not_a_string_map_are_a_permanent_error() -> None:
    with pytest.raises(PermanentDriverError, match="map of strings"):
        make_driver({"driver": "lvm", "parameters": {"volumeGroup": 7}})
    with pytest.raises(PermanentDriverError, match="map of strings"):
        make_exporters({"parameters": ["nvmeofAddresses"]})


@pytest.mark.parametrize("value", ["x:99999", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:", "host:4420",
                                   "10.0.0.256:4420", "10.0.0.1:44\uff120", "[::1]:4420", "10.0.0.1:+4420",
                                   "10.0.0.1:00000000000000004420"])
def test_export_addresses_outside_ipv4_and_ports_1_to_65535_are_refused(value: str) -> None:
    with pytest.raises(PermanentDriverError, match=r"is not <ipv4>:<port> with a port 1\.\.65535"):
        make_exporters({"parameters": {"nvmeofAddresses": value}})
    with pytest.raises(PermanentDriverError):
        parse_addresses(value)


def test_export_addresses_at_the_port_bounds_parse() -> None:
    assert parse_addresses("127.0.0.1:1, 10.1.2.3:65535") == [("127.0.0.1", 1), ("10.1.2.3", 65535)]


@pytest.mark.parametrize(("text", "expected"), [
    ("1n", 1), ("1500m", 2), ("1u", 1), ("1E", 10**18), ("1E3", 1000), ("1e-3", 1), (".5Gi", 2**29), ("1.", 1),
    ("+1Ki", 1024), ("12e2", 1200),
])
def test_every_quantity_the_apiserver_accepts_parses(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["Infinity", "NaN", "1e1000000", "1_000", "1K", "", "1e", "1Gi2", "0x10", "1 Gi"])
def test_quantity_garbage_is_a_value_error_not_an_overflow_or_decimal_trap(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)
