"""The checked-in stubs match the pinned protos (CSI spec, kubelet plugin registration) and grpcio-tools."""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _protogen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("protogen", ROOT / "hack" / "protogen.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["protogen"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


PROTOGEN = _protogen()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("proto", PROTOGEN.PROTOS, ids=lambda p: p.name)
def test_checked_in_proto_is_the_pinned_release(proto: object) -> None:
    assert proto.pinned.exists(), f"{proto.pinned} missing: run make tools"  # type: ignore[attr-defined]
    checked_in = PROTOGEN.STUB_DIR / proto.name  # type: ignore[attr-defined]
    assert _sha(checked_in) == _sha(proto.pinned), "run make proto"  # type: ignore[attr-defined]


@pytest.mark.parametrize("proto", PROTOGEN.PROTOS, ids=lambda p: p.name)
def test_checked_in_stubs_equal_freshly_generated_ones(proto: object, tmp_path: Path) -> None:
    fresh = PROTOGEN.generate(proto.pinned, tmp_path, proto.name)  # type: ignore[attr-defined]
    for name in proto.generated:  # type: ignore[attr-defined]
        assert _sha(fresh / name) == _sha(PROTOGEN.STUB_DIR / name), f"{name} drifted: run make proto"


def test_stubs_import_and_expose_the_csi_and_registration_services() -> None:
    from opensds_csi.proto import csi_pb2, csi_pb2_grpc, pluginregistration_pb2, pluginregistration_pb2_grpc

    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    for service in ("Identity", "Controller", "Node"):
        assert hasattr(csi_pb2_grpc, f"{service}Servicer")
    # kubelet dials /pluginregistration.Registration/GetInfo: the package name is part of the wire API.
    assert pluginregistration_pb2.DESCRIPTOR.package == "pluginregistration"
    assert hasattr(pluginregistration_pb2_grpc, "RegistrationServicer")
