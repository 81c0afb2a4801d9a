"""Backend drivers behind one interface (drivers.base.Driver), chosen by StorageBackend.spec.driver."""
from __future__ import annotations

from typing import Any

from ..quantity import parse_bytes
from .base import Driver, PermanentDriverError


def make_driver(spec: dict[str, Any], secret_key: str | None = None) -> Driver:
    """Build the driver a StorageBackend asks for; PermanentDriverError says what to fix.

    `secret_key` is the credential from spec.secretRef (read by the caller, never logged)."""
    kind = spec.get("driver")
    params: dict[str, str] = dict(spec.get("parameters", {}) or {})
    if kind == "file":
        from .file import FileDriver

        if "path" not in params:
            raise PermanentDriverError("file backend needs parameters.path (a directory on the node)")
        capacity = parse_bytes(params["capacity"]) if "capacity" in params else None
        return FileDriver(params["path"], capacity, params.get("pool", "default"))
    if kind == "lvm":
        from .lvm import LvmDriver

        if "volumeGroup" not in params:
            raise PermanentDriverError("lvm backend needs parameters.volumeGroup")
        return LvmDriver(params["volumeGroup"], params.get("thinPool", "thinpool"))
    if kind == "ceph":
        from .rbd import RbdDriver

        missing = [k for k in ("conf", "pool") if k not in params]
        if missing:
            raise PermanentDriverError(f"ceph backend needs parameters.{' and parameters.'.join(missing)}")
        return RbdDriver(params["conf"], params["pool"], params.get("user", "opensds"), keyring=params.get("keyring"),
                         key=secret_key, clone_depth=int(params.get("cloneDepth", "8")))
    raise PermanentDriverError(f"driver {kind!r} is not available in this release (available: file, lvm, ceph)")
