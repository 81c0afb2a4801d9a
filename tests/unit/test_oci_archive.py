"""hack/oci.py writes OCI archives reproducibly: same inputs, same digests; sorted, clamped layers."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

EPOCH = 1_700_000_000


def _load_oci() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "hack" / "oci.py"
    spec = importlib.util.spec_from_file_location("hack_oci", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["hack_oci"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


oci = _load_oci()


def _rootfs(base: Path, mtime: int) -> Path:
    """A small tree whose files are newer than EPOCH, created in an unsorted order, with a hard link."""
    root = base / "rootfs"
    for rel in ("usr/bin", "etc", "dev", "tmp"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    (root / "usr/bin/zz").write_text("z")
    (root / "usr/bin/aa").write_text("a")
    os.link(root / "usr/bin/aa", root / "usr/bin/aa-link")
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "tmp/scratch").write_text("runtime junk")
    os.symlink("usr/bin", root / "bin")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath) / name, (mtime, mtime), follow_symlinks=False)
    return root


def _build(tmp: Path, mtime: int, names: list[str] | None = None) -> tuple[dict[str, object], Path]:
    rootfs = _rootfs(tmp, mtime)
    extra = tmp / "extra.bin"
    extra.write_bytes(b"\x7fELF static")
    spec = oci.ImageSpec(
        names=names or ["registry.example/sig/tool:v1.2.3"],
        epoch=EPOCH,
        rootfs=[rootfs],
        entries=[oci.Entry("/tool", "file", 0o755, str(extra)), oci.Entry("/tmp", "dir", 0o1777),
                 oci.Entry("/bin/sh", "symlink", 0o777, "/bin/busybox")],
        entrypoint=["/tool"],
        labels={"org.opencontainers.image.version": "v1.2.3"},
    )
    out = tmp / "img.tar"
    return oci.build(spec, out), out


def _blob(archive: Path, digest: str) -> bytes:
    with tarfile.open(archive) as tar:
        f = tar.extractfile("blobs/sha256/" + digest.split(":")[1])
        assert f is not None
        return f.read()


def test_same_inputs_same_digests_even_with_different_mtimes(tmp_path: Path) -> None:
    a, archive_a = _build(tmp_path / "a", EPOCH + 100)
    b, archive_b = _build(tmp_path / "b", EPOCH + 99_999)  # built later: newer files, clamped all the same
    assert a["manifest"] == b["manifest"]
    assert a["layers"] == b["layers"]
    assert hashlib.sha256(archive_a.read_bytes()).digest() == hashlib.sha256(archive_b.read_bytes()).digest()


def test_content_change_changes_digest(tmp_path: Path) -> None:
    before, _ = _build(tmp_path, EPOCH)
    (tmp_path / "rootfs/etc/passwd").write_text("changed\n")
    after = oci.build(oci.ImageSpec(names=["x:1"], epoch=EPOCH, rootfs=[tmp_path / "rootfs"]), tmp_path / "c.tar")
    assert after["layers"][0]["diff_id"] != before["layers"][0]["diff_id"]  # type: ignore[index]


def test_index_names_every_image_for_skopeo_and_containerd(tmp_path: Path) -> None:
    names = ["opensds/busybox:1.35.0", "docker.io/library/busybox:1.35.0"]
    summary, archive = _build(tmp_path, EPOCH, names)
    with tarfile.open(archive) as tar:
        members = tar.getnames()
        index_file = tar.extractfile("index.json")
        layout_file = tar.extractfile("oci-layout")
        assert index_file and layout_file
        index = json.load(index_file)
        assert json.load(layout_file) == {"imageLayoutVersion": "1.0.0"}
    assert members == sorted(members, key=lambda m: (m != "blobs" and not m.startswith("blobs/"), m))
    assert index["mediaType"] == oci.MT_INDEX
    assert [m["annotations"] for m in index["manifests"]] == [
        {"org.opencontainers.image.ref.name": "1.35.0", "io.containerd.image.name": oci.qualify(name)}
        for name in names
    ]
    assert {m["digest"] for m in index["manifests"]} == {summary["manifest"]}
    assert all(m["platform"] == {"architecture": "amd64", "os": "linux"} for m in index["manifests"])


def test_config_and_manifest_point_at_the_layers(tmp_path: Path) -> None:
    summary, archive = _build(tmp_path, EPOCH)
    manifest = json.loads(_blob(archive, str(summary["manifest"])))
    config_bytes = _blob(archive, manifest["config"]["digest"])
    config = json.loads(config_bytes)
    assert manifest["config"]["size"] == len(config_bytes)
    assert config["config"]["Entrypoint"] == ["/tool"]
    assert config["config"]["Labels"] == {"org.opencontainers.image.version": "v1.2.3"}
    assert config["created"] == "2023-11-14T22:13:20Z"
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        blob = _blob(archive, desc["digest"])
        assert desc["mediaType"] == oci.MT_LAYER and desc["size"] == len(blob)
        assert blob[4:8] == b"\0\0\0\0"  # gzip header mtime 0
        assert "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest() == diff_id


def _layer_members(archive: Path, index: int) -> list[tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        index_file = tar.extractfile("index.json")
        assert index_file
        mdigest = json.load(index_file)["manifests"][0]["digest"]
    manifest = json.loads(_blob(archive, mdigest))
    data = gzip.decompress(_blob(archive, manifest["layers"][index]["digest"]))
    with tarfile.open(fileobj=io.BytesIO(data)) as layer:
        return layer.getmembers()


def test_rootfs_layer_sorted_clamped_numeric_without_runtime_dirs(tmp_path: Path) -> None:
    _, archive = _build(tmp_path, EPOCH + 5000)
    members = _layer_members(archive, 0)
    names = [m.name for m in members]
    assert names == ["bin", "dev", "etc", "etc/passwd", "tmp", "usr", "usr/bin", "usr/bin/aa",
                     "usr/bin/aa-link", "usr/bin/zz"]  # tmp kept, its contents left out
    assert all(m.mtime == EPOCH for m in members)
    assert all(m.uname == "" and m.gname == "" for m in members)
    by_name = {m.name: m for m in members}
    assert by_name["usr/bin/aa-link"].islnk() and by_name["usr/bin/aa-link"].linkname == "usr/bin/aa"
    assert by_name["bin"].issym() and by_name["bin"].linkname == "usr/bin"


def test_old_mtimes_are_kept(tmp_path: Path) -> None:
    _, archive = _build(tmp_path, EPOCH - 86400)
    assert {m.mtime for m in _layer_members(archive, 0)} == {EPOCH - 86400}


def test_entries_layer_adds_parents_sorted(tmp_path: Path) -> None:
    _, archive = _build(tmp_path, EPOCH)
    members = _layer_members(archive, 1)
    assert [(m.name, m.mode) for m in members] == [("bin", 0o755), ("bin/sh", 0o777), ("tmp", 0o1777),
                                                  ("tool", 0o755)]
    assert members[1].linkname == "/bin/busybox"


@pytest.mark.parametrize(("name", "repo", "tag"), [
    ("registry.k8s.io/pause:3.10.1", "registry.k8s.io/pause", "3.10.1"),
    ("localhost:5000/opensds/opensds-k8s", "localhost:5000/opensds/opensds-k8s", "latest"),
    ("opensds/busybox:1.35.0", "opensds/busybox", "1.35.0"),
])
def test_split_name(name: str, repo: str, tag: str) -> None:
    assert oci.split_name(name) == (repo, tag)


@pytest.mark.parametrize(("name", "qualified"), [
    ("opensds/opensds-k8s:0.1.0", "docker.io/opensds/opensds-k8s:0.1.0"),
    ("busybox:1.35.0", "docker.io/library/busybox:1.35.0"),
    ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
    ("localhost/x:1", "localhost/x:1"),
    ("127.0.0.1:5000/x:1", "127.0.0.1:5000/x:1"),
])
def test_images_carry_the_name_kubelet_asks_containerd_for(name: str, qualified: str) -> None:
    assert oci.qualify(name) == qualified
