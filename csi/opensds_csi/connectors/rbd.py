"""Transport `rbd`: the kernel RBD client (krbd) maps the image; no target in between.

The dock's publish_context names pool, image and monitors; the cephx identity comes from the
node-stage secrets (`userID`, `userKey`, as in ceph-csi), written to a private key file only for
the length of `rbd device map` so the key never appears in a command line or a log. A mapped
image is found again by pool and image name in `rbd device list --format json`, never by
device order. krbd learns of a resize through its header watch, asynchronously; refresh asks it
to re-read the header now (sysfs `refresh`), so the filesystem grows onto the new size at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from opensds_operator.api import (
    CTX_IMAGE,
    CTX_MONITORS,
    CTX_POOL,
    CTX_TRANSPORT,
    RBD_USER_ID,
    RBD_USER_KEY,
    volume_backend_id,
)

from ..errors import FailedPrecondition, InvalidArgument
from ..run import CommandFailed, run
from .base import context_field, require_uid, sys_block

KEY_DIR = "/run/opensds"  # tmpfs: a key file never reaches a disk


def mapped_device(pool: str, image: str) -> str | None:
    out = run("rbd", "device", "list", "--format", "json").stdout
    for mapping in json.loads(out or "[]"):
        if mapping.get("pool") == pool and mapping.get("name") == image and mapping.get("snap") in ("-", "", None):
            return str(mapping["device"])
    return None


@contextlib.contextmanager
def _key_file(key: str) -> Iterator[str]:
    Path(KEY_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(KEY_DIR, 0o700)  # also when an older release (or a human) made it with wider rights
    fd, path = tempfile.mkstemp(dir=KEY_DIR, prefix="cephx-")
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp creates it 0600
            f.write(key)
        yield path
    finally:
        os.unlink(path)


class RbdConnector:
    def volume_uid(self, volume_id: str, context: Mapping[str, str]) -> str:
        image = context_field(volume_id, context, CTX_IMAGE)
        uid = require_uid(volume_id, "image", image.removeprefix("vol-"))
        if image != volume_backend_id(uid):
            raise InvalidArgument(f"publish_context of {volume_id}: image {image!r} is not named vol-<uid>")
        return uid

    def _fields(self, volume_id: str, context: Mapping[str, str]) -> tuple[str, str, str]:
        self.volume_uid(volume_id, context)
        return (context_field(volume_id, context, CTX_POOL), context[CTX_IMAGE],
                context_field(volume_id, context, CTX_MONITORS))

    def attach(self, volume_id: str, context: Mapping[str, str], secrets: Mapping[str, str]) -> str:
        pool, image, monitors = self._fields(volume_id, context)
        existing = mapped_device(pool, image)
        if existing:
            return existing
        user, key = secrets.get(RBD_USER_ID), secrets.get(RBD_USER_KEY)
        if not user or not key:
            raise InvalidArgument(f"volume {volume_id} is an RBD image: node-stage secrets need {RBD_USER_ID} and "
                                  f"{RBD_USER_KEY} "
                                  f"(set the StorageProfile's nodeStageSecretRef)")
        with _key_file(key) as key_path:
            try:
                out = run("rbd", "--conf", "/dev/null", "-m", monitors, "--id", user, "--keyfile", key_path,
                          "device", "map", f"{pool}/{image}").stdout
            except CommandFailed as e:
                raise FailedPrecondition(f"volume {volume_id}: rbd map {pool}/{image} as client.{user} failed: "
                                         f"{e.stderr.strip()}") from e
        return out.strip().splitlines()[-1] if out.strip() else (mapped_device(pool, image) or "")

    def detach(self, volume_id: str, context: Mapping[str, str], device: str | None) -> None:
        pool, image = context.get(CTX_POOL), context.get(CTX_IMAGE)
        current = mapped_device(pool, image) if pool and image else None
        if current:
            run("blockdev", "--flushbufs", current, ok_codes=(0, 1))
            run("rbd", "device", "unmap", current, ok_codes=(0, 22))  # 22: not mapped (any more)

    def refresh(self, device: str) -> None:
        refresh = sys_block(device) / "device" / "refresh"
        if refresh.exists():
            refresh.write_text("1")

    def identify(self, device: str) -> dict[str, str] | None:
        """Pool and image of a krbd device (/sys/bus/rbd/devices/<id>/{pool,name})."""
        name = Path(device).resolve().name
        if not name.startswith("rbd") or not name.removeprefix("rbd").isdigit():
            return None
        attributes = Path("/sys/bus/rbd/devices") / name.removeprefix("rbd")
        try:
            pool, image = (attributes / "pool").read_text().strip(), (attributes / "name").read_text().strip()
        except OSError:
            return None
        return {CTX_TRANSPORT: "rbd", CTX_POOL: pool, CTX_IMAGE: image} if image.startswith("vol-") else None
