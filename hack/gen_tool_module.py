#!/usr/bin/env python3
"""Write a go.mod that builds binaries of an upstream Go module at a pinned version.

`go install module@version` refuses modules whose go.mod has `replace` directives
(k8s.io/kubernetes, etcd, most CSI sidecars), because replaces apply only to the main
module. So each tool group gets its own tiny main module under hack/tools/<group>/ that
requires the upstream module and re-states its replaces:

* a replace onto another module version is copied as is;
* a replace onto a local directory (kubernetes' ./staging/src/k8s.io/api, etcd's ../api)
  becomes a replace onto the published module at the matching version: the version the
  upstream go.mod requires, or, for kubernetes' `v0.0.0` placeholders, v0.<minor>.<patch>;
* replaces onto FORBIDDEN_DEPENDENCY guards are dropped (nothing requires them).

Usage: gen_tool_module.py <dir> <module> <version> <package>...
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPLACE_RE = re.compile(r"^\s*(?:replace\s+)?(\S+)(?:\s+(\S+))?\s+=>\s+(\S+)(?:\s+(\S+))?\s*$")


def upstream_gomod(module: str, version: str) -> str:
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        check=True, capture_output=True, text=True,
    ).stdout
    return Path(json.loads(out)["GoMod"]).read_text()


def required_versions(gomod: str) -> dict[str, str]:
    versions: dict[str, str] = {}
    for line in gomod.splitlines():
        m = re.match(r"^\s*(?:require\s+)?([\w.\-/~]+\.[\w.\-/~]+)\s+(v\S+)", line)
        if m and "=>" not in line:
            versions.setdefault(m.group(1), m.group(2))
    return versions


def replace_lines(gomod: str, version: str) -> list[str]:
    required = required_versions(gomod)
    major_minor_patch = version.lstrip("v").split(".")
    staging = f"v0.{major_minor_patch[1]}.{major_minor_patch[2]}"
    lines: list[str] = []
    for raw in gomod.splitlines():
        if "=>" not in raw:
            continue
        m = REPLACE_RE.match(raw.split("//")[0])
        if not m:
            continue
        old, old_version, new, new_version = m.groups()
        if new_version:  # replace onto a published module version
            lhs = f"{old} {old_version}" if old_version else old
            lines.append(f"replace {lhs} => {new} {new_version}")
        elif "FORBIDDEN" in new:
            continue
        else:  # local directory: use the published module at the matching version
            pinned = required.get(old, "v0.0.0")
            if pinned == "v0.0.0":
                pinned = staging
            lines.append(f"replace {old} => {old} {pinned}")
    return lines


def main() -> None:
    directory, module, version, *packages = sys.argv[1:]
    gomod = upstream_gomod(module, version)
    go_line = re.search(r"^go\s+(\S+)", gomod, re.M)
    tool_dir = Path(directory)
    tool_dir.mkdir(parents=True, exist_ok=True)
    (tool_dir / "go.sum").unlink(missing_ok=True)
    body = [
        f"module opensds.io/hack/tools/{tool_dir.name}",
        "",
        f"go {go_line.group(1) if go_line else '1.24.0'}",
        "",
        f"require {module} {version}",
        "",
        *replace_lines(gomod, version),
        "",
    ]
    (tool_dir / "go.mod").write_text("\n".join(body))
    env = {"GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    for package in packages:
        subprocess.run(["go", "get", "-tool", f"{package}@{version}"], cwd=tool_dir, check=True,
                       env={**os.environ, **env})


if __name__ == "__main__":
    main()
