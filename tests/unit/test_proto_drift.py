"""The checked-in CSI stubs match the pinned csi.proto and the pinned grpcio-tools."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _protogen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protogen", ROOT / "hack" / "protogen.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checked_in_proto_is_the_pinned_spec_release() -> None:
    protogen = _protogen()
    assert protogen.PINNED_PROTO.exists(), "bin/csi-spec/csi.proto missing: run make tools"
    assert _sha(protogen.STUB_DIR / "csi.proto") == _sha(protogen.PINNED_PROTO), "run make proto"


def test_checked_in_stubs_equal_freshly_generated_ones(tmp_path: Path) -> None:
    protogen = _protogen()
    fresh = protogen.generate(protogen.PINNED_PROTO, tmp_path)
    for name in protogen.GENERATED:
        assert _sha(fresh / name) == _sha(protogen.STUB_DIR / name), f"{name} drifted: run make proto"


def test_stubs_import_and_expose_the_three_csi_services() -> None:
    from opensds_csi.proto import csi_pb2, csi_pb2_grpc

    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    for service in ("Identity", "Controller", "Node"):
        assert hasattr(csi_pb2_grpc, f"{service}Servicer")
