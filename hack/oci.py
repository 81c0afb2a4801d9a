#!/usr/bin/env python3
"""Write a reproducible OCI image archive (`oci-archive:` for skopeo, `ctr images import` for containerd).

Stdlib only. Every layer is a sorted tar with numeric owners and mtimes clamped to --epoch
(SOURCE_DATE_EPOCH), gzip-compressed with header mtime 0, so the same inputs give the same digests.

    oci.py --out img.tar --name registry.k8s.io/sig-storage/csi-provisioner:v6.4.0 \\
        --file bin/csi-provisioner=/csi-provisioner:0755 --dir-entry /tmp:1777 \\
        --entrypoint '["/csi-provisioner"]' --label org.opencontainers.image.version=v6.4.0

A layer comes from a directory (--rootfs DIR, e.g. an mmdebstrap tree) and/or from single entries
(--file, --dir-entry, --symlink), which form one more layer. Several --name values put several
entries (same manifest) into index.json, each with `org.opencontainers.image.ref.name` (the tag)
and `io.containerd.image.name` (the full name).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CHUNK = 1 << 20
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Entry:
    """One path of a layer built from explicit entries. kind: file, dir or symlink."""

    path: str  # absolute path inside the image
    kind: str
    mode: int = 0o755
    source: str = ""  # host file (file) or link target (symlink)
    uid: int = 0
    gid: int = 0


@dataclass
class Layer:
    diff_id: str  # sha256 of the uncompressed tar
    digest: str  # sha256 of the gzip blob
    size: int  # compressed size
    diff_size: int  # uncompressed size
    blob: Path


@dataclass
class ImageSpec:
    names: list[str]
    epoch: int
    rootfs: list[Path] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    empty_dirs: tuple[str, ...] = ("dev", "proc", "sys", "run", "tmp", "var/tmp")
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH])
    workdir: str = "/"
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str = ""
    architecture: str = "amd64"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def split_name(name: str) -> tuple[str, str]:
    """'registry.k8s.io/pause:3.10' -> ('registry.k8s.io/pause', '3.10'); no tag means latest."""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, "latest"


def qualify(name: str) -> str:
    """The fully qualified reference a container runtime resolves `name` to (Docker's rules).

    Kubelet asks containerd's CRI for `docker.io/opensds/opensds-k8s:0.1.0` when a pod says
    `opensds/opensds-k8s:0.1.0`, so that is the name an imported image must carry.
    """
    first, sep, _ = name.partition("/")
    if not sep:  # "busybox:1.35.0"
        return f"docker.io/library/{name}"
    if "." in first or ":" in first or first == "localhost":
        return name
    return f"docker.io/{name}"


def normalize(info: tarfile.TarInfo, epoch: int) -> tarfile.TarInfo:
    """Numeric owners only, mtime clamped to epoch, no device numbers on non-devices."""
    info.uname = info.gname = ""
    info.mtime = min(int(info.mtime), epoch)
    info.pax_headers = {}
    return info


def _walk_sorted(root: Path, empty_dirs: Iterable[str]) -> Iterator[str]:
    """Relative paths under root (not root itself), parents before children, sorted by name.
    The contents of empty_dirs (runtime mounts such as dev, proc, tmp) are left out."""
    skip = {d.strip("/") for d in empty_dirs}

    def walk(rel: str) -> Iterator[str]:
        here = root / rel if rel else root
        for name in sorted(os.listdir(here)):
            child = f"{rel}/{name}" if rel else name
            yield child
            full = root / child
            if full.is_dir() and not full.is_symlink() and child not in skip:
                yield from walk(child)

    return walk("")


def _write_dir_layer(tar: tarfile.TarFile, root: Path, epoch: int, empty_dirs: Iterable[str]) -> None:
    for rel in _walk_sorted(root, empty_dirs):
        full = root / rel
        st = full.lstat()
        if stat.S_ISSOCK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            continue
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            continue  # device nodes come from the runtime
        info = normalize(tar.gettarinfo(str(full), arcname=rel), epoch)  # detects hard links
        if info.isreg():
            with full.open("rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)


def _entry_infos(entries: Iterable[Entry], epoch: int) -> list[tuple[tarfile.TarInfo, str]]:
    """TarInfos for explicit entries plus any missing parent directories, sorted by path."""
    by_path: dict[str, tuple[tarfile.TarInfo, str]] = {}
    for e in entries:
        rel = e.path.strip("/")
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in by_path:
                d = tarfile.TarInfo(parent)
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, epoch
                by_path[parent] = (d, "")
        info = tarfile.TarInfo(rel)
        info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, epoch
        if e.kind == "dir":
            info.type = tarfile.DIRTYPE
        elif e.kind == "symlink":
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, e.source, 0o777
        elif e.kind == "file":
            info.size = os.path.getsize(e.source)
        else:
            raise ValueError(f"unknown entry kind {e.kind!r}")
        by_path[rel] = (info, e.source if e.kind == "file" else "")
    return [by_path[p] for p in sorted(by_path)]


def _write_entries_layer(tar: tarfile.TarFile, entries: Iterable[Entry], epoch: int) -> None:
    for info, source in _entry_infos(entries, epoch):
        normalize(info, epoch)
        if source:
            with open(source, "rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)


def make_layer(workdir: Path, epoch: int, *, rootfs: Path | None = None, entries: list[Entry] | None = None,
               empty_dirs: Iterable[str] = ()) -> Layer:
    """Write one layer blob into workdir; exactly one of rootfs / entries."""
    raw = workdir / "layer.tar"
    with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tar:
        if rootfs is not None:
            _write_dir_layer(tar, rootfs, epoch, empty_dirs)
        else:
            _write_entries_layer(tar, entries or [], epoch)
    diff_id = sha256_file(raw)
    gz = workdir / "layer.tar.gz"
    with raw.open("rb") as src, gz.open("wb") as out, \
            gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0) as z:
        shutil.copyfileobj(src, z, CHUNK)
    diff_size = raw.stat().st_size
    raw.unlink()
    digest = sha256_file(gz)
    blob = workdir / digest.split(":")[1]
    gz.rename(blob)
    return Layer(diff_id, digest, blob.stat().st_size, diff_size, blob)


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}


def image_config(spec: ImageSpec, layers: list[Layer]) -> dict[str, object]:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(spec.epoch))
    cfg: dict[str, object] = {"Env": spec.env, "WorkingDir": spec.workdir, "Labels": spec.labels}
    if spec.entrypoint is not None:
        cfg["Entrypoint"] = spec.entrypoint
    if spec.cmd is not None:
        cfg["Cmd"] = spec.cmd
    if spec.user:
        cfg["User"] = spec.user
    if spec.stop_signal:
        cfg["StopSignal"] = spec.stop_signal
    return {
        "created": created,
        "architecture": spec.architecture,
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": created, "created_by": "hack/oci.py"} for _ in layers],
    }


def build(spec: ImageSpec, out: Path) -> dict[str, object]:
    """Write the oci-archive to out; return a summary (digests and sizes)."""
    if not spec.names:
        raise ValueError("at least one --name")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".oci-") as tmp:
        work = Path(tmp)
        layers = [make_layer(work, spec.epoch, rootfs=r, empty_dirs=spec.empty_dirs) for r in spec.rootfs]
        if spec.entries:
            layers.append(make_layer(work, spec.epoch, entries=spec.entries))
        config = canonical(image_config(spec, layers))
        manifest = canonical({
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": descriptor(MT_CONFIG, config),
            "layers": [{"mediaType": MT_LAYER, "digest": x.digest, "size": x.size} for x in layers],
        })
        mdesc = descriptor(MT_MANIFEST, manifest)
        index_entries = []
        for name in spec.names:
            _, tag = split_name(name)
            index_entries.append({
                **mdesc,
                "platform": {"architecture": spec.architecture, "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": tag, "io.containerd.image.name": qualify(name)},
            })
        index = canonical({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": index_entries})
        blobs: dict[str, bytes | Path] = {x.digest: x.blob for x in layers}
        blobs[str(descriptor(MT_CONFIG, config)["digest"])] = config
        blobs[str(mdesc["digest"])] = manifest
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for d in ("blobs", "blobs/sha256"):
                info = normalize(tarfile.TarInfo(d), spec.epoch)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, spec.epoch
                tar.addfile(info)
            for digest in sorted(blobs):
                _add_member(tar, "blobs/sha256/" + digest.split(":")[1], blobs[digest], spec.epoch)
            _add_member(tar, "index.json", index, spec.epoch)
            _add_member(tar, "oci-layout", canonical({"imageLayoutVersion": "1.0.0"}), spec.epoch)
        partial.rename(out)
    return {
        "archive": str(out),
        "names": spec.names,
        "manifest": mdesc["digest"],
        "config": descriptor(MT_CONFIG, config)["digest"],
        "layers": [{"digest": x.digest, "diff_id": x.diff_id, "size": x.size, "diff_size": x.diff_size}
                   for x in layers],
        "compressed_size": sum(x.size for x in layers),
        "uncompressed_size": sum(x.diff_size for x in layers),
    }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes | Path, epoch: int) -> None:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = 0o644, epoch
    if isinstance(data, Path):
        info.size = data.stat().st_size
        with data.open("rb") as f:
            tar.addfile(info, f)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _mode(text: str, default: int) -> int:
    return int(text, 8) if text else default


def parse_args(argv: list[str] | None = None) -> tuple[ImageSpec, Path, Path | None]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="the oci-archive to write")
    p.add_argument("--name", action="append", required=True, help="full image name; repeat for aliases")
    p.add_argument("--epoch", type=int, default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")))
    p.add_argument("--rootfs", action="append", type=Path, default=[], help="a layer from this directory")
    p.add_argument("--empty-dir", action="append", default=None,
                   help="keep this rootfs directory but none of its contents (default: dev proc sys run tmp var/tmp)")
    p.add_argument("--file", action="append", default=[], metavar="SRC=/DEST[:MODE]")
    p.add_argument("--dir-entry", action="append", default=[], metavar="/DIR[:MODE]")
    p.add_argument("--symlink", action="append", default=[], metavar="/LINK=TARGET")
    p.add_argument("--entrypoint", type=json.loads, default=None, help="JSON list")
    p.add_argument("--cmd", type=json.loads, default=None, help="JSON list")
    p.add_argument("--env", action="append", default=None, metavar="K=V")
    p.add_argument("--workdir", default="/")
    p.add_argument("--user", default="")
    p.add_argument("--stop-signal", default="")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p.add_argument("--summary", type=Path, help="also write the JSON summary here")
    a = p.parse_args(argv)
    entries: list[Entry] = []
    for f in a.file:
        src, _, rest = f.partition("=")
        dest, _, mode = rest.partition(":")
        entries.append(Entry(dest, "file", _mode(mode, 0o755 if os.access(src, os.X_OK) else 0o644), src))
    for d in a.dir_entry:
        path, _, mode = d.partition(":")
        entries.append(Entry(path, "dir", _mode(mode, 0o755)))
    for s in a.symlink:
        link, _, target = s.partition("=")
        entries.append(Entry(link, "symlink", 0o777, target))
    spec = ImageSpec(
        names=a.name, epoch=a.epoch, rootfs=a.rootfs, entries=entries, entrypoint=a.entrypoint, cmd=a.cmd,
        workdir=a.workdir, user=a.user, stop_signal=a.stop_signal,
        labels=dict(kv.split("=", 1) for kv in a.label),
    )
    if a.env is not None:
        spec.env = a.env
    if a.empty_dir is not None:
        spec.empty_dirs = tuple(a.empty_dir)
    return spec, a.out, a.summary


def main(argv: list[str] | None = None) -> None:
    spec, out, summary_path = parse_args(argv)
    summary = build(spec, out)
    text = json.dumps(summary, indent=2)
    if summary_path:
        summary_path.write_text(text + "\n")
    print(f"oci: {out} {summary['manifest']} {summary['compressed_size']} bytes "
          f"({summary['uncompressed_size']} uncompressed)")


if __name__ == "__main__":
    main()
