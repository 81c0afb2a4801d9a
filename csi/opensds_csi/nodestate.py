"""What the node plugin has staged and published, persisted per volume.

Kubelet retries every call after a plugin restart; this record is how a restarted plugin
answers them idempotently (same staging path: OK; unknown volume: NOT_FOUND for stats).
One JSON file per volume, replaced atomically.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


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


class NodeState:
    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, volume_id: str) -> Path:
        return self.dir / (base64.urlsafe_b64encode(volume_id.encode()).decode().rstrip("=") + ".json")

    def get(self, volume_id: str) -> StagedVolume | None:
        try:
            return StagedVolume(**json.loads(self._file(volume_id).read_text()))
        except FileNotFoundError:
            return None

    def save(self, volume: StagedVolume) -> None:
        path = self._file(volume.volume_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(volume)))
        os.replace(tmp, path)

    def remove(self, volume_id: str) -> None:
        self._file(volume_id).unlink(missing_ok=True)

    def all(self) -> list[StagedVolume]:
        return [StagedVolume(**json.loads(p.read_text())) for p in sorted(self.dir.glob("*.json"))]
