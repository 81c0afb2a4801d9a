#!/usr/bin/env python3
"""Generate the Python gRPC stubs (and their .pyi types) from the pinned protos.

Two protos, both copied from pinned Go modules by hack/tools.sh: the CSI spec's csi.proto and
kubelet's plugin-registration api.proto (how the node plugin registers itself with kubelet).
`make proto` runs this to refresh csi/opensds_csi/proto/; tests/unit/test_proto_drift.py
runs `generate()` into a temporary directory and compares, so stubs that drift from the
pinned protos (or from the pinned grpcio-tools) fail the build.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
STUB_DIR = ROOT / "csi" / "opensds_csi" / "proto"


@dataclass(frozen=True)
class Proto:
    pinned: Path  # the file hack/tools.sh copied from its pinned module
    name: str     # its name inside opensds_csi/proto/ (the stubs are named after it)

    @property
    def generated(self) -> tuple[str, ...]:
        stem = Path(self.name).stem
        return tuple(f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))


PROTOS = (
    Proto(ROOT / "bin" / "csi-spec" / "csi.proto", "csi.proto"),
    Proto(ROOT / "bin" / "kubelet-api" / "api.proto", "pluginregistration.proto"),
)
# Kept for the CSI-only callers.
PINNED_PROTO = PROTOS[0].pinned
GENERATED = PROTOS[0].generated


def generate(proto: Path, out_root: Path, name: str = "csi.proto") -> Path:
    """Compile `proto` as opensds_csi/proto/<name> under out_root; return the stub folder."""
    rel = Path("opensds_csi") / "proto" / name
    src_root = out_root / "src"
    (src_root / rel.parent).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(proto, src_root / rel)
    include = Path(protoc.__file__).parent / "_proto"
    plugins = Path(sys.executable).parent  # mypy-protobuf's protoc plugins live beside the interpreter
    args = [
        "grpc_tools.protoc",
        f"-I{src_root}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        str(src_root / rel),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
    return out_root / rel.parent


def main() -> None:
    for proto in PROTOS:
        if not proto.pinned.exists():
            sys.exit(f"{proto.pinned} missing: run 'make tools' first")
    STUB_DIR.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        with tempfile.TemporaryDirectory() as tmp:
            out = generate(proto.pinned, Path(tmp), proto.name)
            shutil.copyfile(proto.pinned, STUB_DIR / proto.name)
            for name in proto.generated:
                shutil.copyfile(out / name, STUB_DIR / name)
    (STUB_DIR / "__init__.py").write_text('"""Generated gRPC stubs (make proto); do not edit."""\n')
    print(f"stubs written to {STUB_DIR}")


if __name__ == "__main__":
    main()
