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

from ..errors import FailedPrecondition, InvalidArgument
from ..run import CommandFailed, run
from .base import sys_block

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
    fd, path = tempfile.mkstemp(dir=KEY_DIR, prefix="cephx-")
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp creates it 0600
            f.write(key)
        yield path
    finally:
        os.unlink(path)


class RbdConnector:
    @staticmethod
    def _fields(volume_id: str, context: Mapping[str, str]) -> tuple[str, str, str]:
        try:
            return context["pool"], context["image"], context["monitors"]
        except KeyError as e:
            raise InvalidArgument(f"publish_context of {volume_id} lacks {e.args[0]!r}") from None

    def attach(self, volume_id: str, context: Mapping[str, str], secrets: Mapping[str, str]) -> str:
        pool, image, monitors = self._fields(volume_id, context)
        existing = mapped_device(pool, image)
        if existing:
            return existing
        user, key = secrets.get("userID"), secrets.get("userKey")
        if not user or not key:
            raise InvalidArgument(f"volume {volume_id} is an RBD image: node-stage secrets need userID and userKey "
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
        pool, image = context.get("pool"), context.get("image")
        current = mapped_device(pool, image) if pool and image else None
        if current:
            run("blockdev", "--flushbufs", current, ok_codes=(0, 1))
            run("rbd", "device", "unmap", current, ok_codes=(0, 22))  # 22: not mapped (any more)

    def refresh(self, device: str) -> None:
        refresh = sys_block(device) / "device" / "refresh"
        if refresh.exists():
            refresh.write_text("1")
