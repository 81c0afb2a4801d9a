"""What the node plugin has staged and published, persisted per volume.

Kubelet retries every call after a plugin restart; this record is how a restarted plugin
answers them idempotently (same staging path: OK; unknown volume: NOT_FOUND for stats).
One JSON file per volume, written crash-safely: a temporary file, fsync, atomic rename, fsync
of the directory, so after a crash (or power loss) a record is either the old or the new one.
A record that is unreadable all the same (a disk error, a hand edit) is CorruptState: it is
set aside as `<name>.corrupt` for a human and never blocks NodeUnstage (the node falls back to
what the mount table and the devices say).
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class CorruptState(Exception):
    """A state file exists but does not hold a valid record."""


@dataclass
class StagedVolume:
    volume_id: str
    transport: str
    context: dict[str, str]
    device: str
    staging_path: str
    access_type: str  # "mount" or "block"
    fs_type: str = ""
    mount_flags: list[str] = field(default_factory=list)
    targets: dict[str, bool] = field(default_factory=dict)  # publish target -> read-only
    throttled: dict[str, str] = field(default_factory=dict)  # publish target -> pod cgroup with io.max

    def paths(self) -> set[str]:
        return {self.staging_path, *self.targets}


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NodeState:
    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.dir.glob("*.tmp"):  # a save interrupted by a crash; its target is intact
            leftover.unlink(missing_ok=True)

    def _file(self, volume_id: str) -> Path:
        return self.dir / (base64.urlsafe_b64encode(volume_id.encode()).decode().rstrip("=") + ".json")

    @staticmethod
    def _load(path: Path) -> StagedVolume:
        try:
            data = json.loads(path.read_bytes())
            volume = StagedVolume(**data)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise CorruptState(f"state file {path} is unreadable: {e}") from e
        if not isinstance(volume.volume_id, str) or not isinstance(volume.context, dict):
            raise CorruptState(f"state file {path} has fields of the wrong types")
        return volume

    def get(self, volume_id: str) -> StagedVolume | None:
        """The record of a volume; None when there is none; CorruptState when it cannot be read."""
        try:
            return self._load(self._file(volume_id))
        except FileNotFoundError:
            return None

    def save(self, volume: StagedVolume) -> None:
        path = self._file(volume.volume_id)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=path.stem + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(volume), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.dir)

    def remove(self, volume_id: str) -> None:
        self._file(volume_id).unlink(missing_ok=True)
        _fsync_dir(self.dir)

    def set_aside(self, volume_id: str) -> Path:
        """Move an unreadable record out of the way (kept for a human as <name>.corrupt)."""
        path = self._file(volume_id)
        kept = path.with_suffix(".corrupt")
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, kept)
        _fsync_dir(self.dir)
        return kept

    def all(self) -> list[StagedVolume]:
        """Every readable record; unreadable ones are logged and skipped, not fatal."""
        found = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                found.append(self._load(path))
            except CorruptState as e:
                log.error("%s", e)
            except FileNotFoundError:
                continue
        return found
