"""Backend drivers behind one interface (drivers.base.Driver), chosen by StorageBackend.spec.driver.

The CRD rejects malformed parameters at the API; objects stored before a rule existed (or
written around it) still reach `make_driver`, so every parameter is checked here again and a
bad one is a PermanentDriverError naming it: a condition and an Event, never a traceback.
"""
from __future__ import annotations

import re
from typing import Any

from ..quantity import parse_bytes
from .base import Driver, PermanentDriverError

# LVM names: letters, digits and "+_.-", never a leading "-" (it would be read as an option).
_LVM_NAME = re.compile(r"[A-Za-z0-9_.+][A-Za-z0-9_.+-]{0,126}")
_CEPH_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # newlines/NULs in a value would split a config line or a path
MAX_CLONE_DEPTH = 32
MAX_CAPACITY = 2**60  # 1Ei, as the CRD allows


def _name(params: dict[str, str], key: str, default: str, what: str) -> str:
    value = params.get(key, default)
    if not _LVM_NAME.fullmatch(value) or value in (".", ".."):
        raise PermanentDriverError(f"parameters.{key} {value!r} is not {what}: letters, digits and '+_.-', "
                                   f"not starting with '-', at most 127 characters")
    return value


def _path(params: dict[str, str], key: str) -> str:
    value = params[key]
    if not value.startswith("/") or ".." in value.split("/") or "\0" in value:
        raise PermanentDriverError(f"parameters.{key} {value!r} must be an absolute path without '..' components")
    return value


def _capacity(params: dict[str, str]) -> int | None:
    if "capacity" not in params:
        return None
    try:
        capacity = parse_bytes(params["capacity"])
    except ValueError:
        capacity = -1
    if not 0 < capacity <= MAX_CAPACITY:
        raise PermanentDriverError(f"parameters.capacity {params['capacity']!r} must be a positive quantity "
                                   f"of at most 1Ei such as 100Gi")
    return capacity


def _clone_depth(params: dict[str, str]) -> int:
    value = params.get("cloneDepth", "8")
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_CLONE_DEPTH:
        raise PermanentDriverError(f"parameters.cloneDepth {value!r} must be an integer from 0 to "
                                   f"{MAX_CLONE_DEPTH} (0: always flatten clones)")
    return int(value)


def parameters(spec: dict[str, Any]) -> dict[str, str]:
    """spec.parameters as a string map; anything else is a PermanentDriverError."""
    params = spec.get("parameters") or {}
    if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
        raise PermanentDriverError("spec.parameters must be a map of strings to strings")
    for key, value in params.items():
        if _CONTROL.search(value):
            raise PermanentDriverError(f"parameters.{key} must not contain control characters")
    return dict(params)


def check_parameters(params: dict[str, str]) -> None:
    """Every known parameter that is present is well-formed (the CRD's rules, key by key).

    Pure: the CR-spec fuzz test checks that whatever the apiserver accepts passes here too."""
    for key, what in (("volumeGroup", "an LVM volume group name"), ("thinPool", "an LVM logical volume name"),
                      ("pool", "a pool name")):
        if key in params:
            _name(params, key, "", what)
    for key in ("path", "conf", "keyring"):
        if key in params:
            _path(params, key)
    _capacity(params)
    _clone_depth(params)
    if "user" in params and not _CEPH_USER.fullmatch(params["user"]):
        raise PermanentDriverError(f"parameters.user {params['user']!r} must be a Ceph client id: letters, digits, "
                                   f"'_.-', not starting with '-' or '.'")


def make_driver(spec: dict[str, Any], secret_key: str | None = None) -> Driver:
    """Build the driver a StorageBackend asks for; PermanentDriverError says what to fix.

    `secret_key` is the credential from spec.secretRef (read by the caller, never logged)."""
    kind = spec.get("driver")
    params = parameters(spec)
    check_parameters(params)
    if kind == "file":
        from .file import FileDriver

        if "path" not in params:
            raise PermanentDriverError("file backend needs parameters.path (a directory on the node)")
        return FileDriver(params["path"], _capacity(params), params.get("pool", "default"))
    if kind == "lvm":
        from .lvm import LvmDriver

        if "volumeGroup" not in params:
            raise PermanentDriverError("lvm backend needs parameters.volumeGroup")
        return LvmDriver(params["volumeGroup"], params.get("thinPool", "thinpool"))
    if kind == "ceph":
        missing = [k for k in ("conf", "pool") if k not in params]
        if missing:
            raise PermanentDriverError(f"ceph backend needs parameters.{' and parameters.'.join(missing)}")
        from .rbd import RbdDriver

        return RbdDriver(params["conf"], params["pool"], params.get("user", "opensds"), keyring=params.get("keyring"),
                         key=secret_key, clone_depth=_clone_depth(params))
    raise PermanentDriverError(f"driver {kind!r} is not available in this release (available: file, lvm, ceph)")
