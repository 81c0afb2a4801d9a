#!/usr/bin/env python3
"""Generate the Python gRPC stubs (and their .pyi types) from the pinned csi.proto.

`make proto` runs this to refresh csi/opensds_csi/proto/; tests/unit/test_proto_drift.py
runs `generate()` into a temporary directory and compares, so stubs that drift from the
pinned proto (or from the pinned grpcio-tools) fail the build.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PINNED_PROTO = ROOT / "bin" / "csi-spec" / "csi.proto"  # copied from the pinned module by hack/tools.sh
PROTO_REL = Path("opensds_csi") / "proto" / "csi.proto"
STUB_DIR = ROOT / "csi" / PROTO_REL.parent
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py", "csi_pb2_grpc.pyi")


def generate(proto: Path, out_root: Path) -> Path:
    """Compile `proto` as opensds_csi/proto/csi.proto under out_root; return the stub folder."""
    src_root = out_root / "src"
    (src_root / PROTO_REL.parent).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(proto, src_root / PROTO_REL)
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
        str(src_root / PROTO_REL),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
    return out_root / PROTO_REL.parent


def main() -> None:
    if not PINNED_PROTO.exists():
        sys.exit(f"{PINNED_PROTO} missing: run 'make tools' first")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = generate(PINNED_PROTO, Path(tmp))
        STUB_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PINNED_PROTO, STUB_DIR / "csi.proto")
        for name in GENERATED:
            shutil.copyfile(out / name, STUB_DIR / name)
    (STUB_DIR / "__init__.py").write_text('"""Generated CSI gRPC stubs (make proto); do not edit."""\n')
    print(f"stubs written to {STUB_DIR}")


if __name__ == "__main__":
    main()
