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
    return dict(params)


def make_driver(spec: dict[str, Any], secret_key: str | None = None) -> Driver:
    """Build the driver a StorageBackend asks for; PermanentDriverError says what to fix.

    `secret_key` is the credential from spec.secretRef (read by the caller, never logged)."""
    kind = spec.get("driver")
    params = parameters(spec)
    if kind == "file":
        from .file import FileDriver

        if "path" not in params:
            raise PermanentDriverError("file backend needs parameters.path (a directory on the node)")
        return FileDriver(_path(params, "path"), _capacity(params), _name(params, "pool", "default", "a pool name"))
    if kind == "lvm":
        from .lvm import LvmDriver

        if "volumeGroup" not in params:
            raise PermanentDriverError("lvm backend needs parameters.volumeGroup")
        return LvmDriver(_name(params, "volumeGroup", "", "an LVM volume group name"),
                         _name(params, "thinPool", "thinpool", "an LVM logical volume name"))
    if kind == "ceph":
        missing = [k for k in ("conf", "pool") if k not in params]
        if missing:
            raise PermanentDriverError(f"ceph backend needs parameters.{' and parameters.'.join(missing)}")
        conf, pool = _path(params, "conf"), _name(params, "pool", "", "a pool name")
        user = params.get("user", "opensds")
        if not _CEPH_USER.fullmatch(user):
            raise PermanentDriverError(f"parameters.user {user!r} must be a Ceph client id: letters, digits, "
                                       f"'_.-', not starting with '-' or '.'")
        keyring = _path(params, "keyring") if "keyring" in params else None
        depth = _clone_depth(params)
        from .rbd import RbdDriver

        return RbdDriver(conf, pool, user, keyring=keyring, key=secret_key, clone_depth=depth)
    raise PermanentDriverError(f"driver {kind!r} is not available in this release (available: file, lvm, ceph)")
