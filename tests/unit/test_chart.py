"""The Helm chart and the kustomize base ship the same product (one is not a stale copy of the other).

Both are rendered with the pinned helm and kustomize (bin/, from `make tools`) and compared object
by object after dropping what only one of them adds (Helm's labels, kustomize's namespace field).
"""
from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "opensds"
HELM_LABELS = {"app.kubernetes.io/part-of", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance",
               "helm.sh/chart"}


def _render(*command: str) -> list[dict[str, Any]]:
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _helm(*args: str) -> list[dict[str, Any]]:
    return _render(str(ROOT / "bin" / "helm"), "template", "opensds", str(CHART), "-n", "opensds-system",
                   "--kube-version", "1.34.4", *args)


def _normalise(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    meta.pop("namespace", None)
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k not in HELM_LABELS}
    if labels:
        meta["labels"] = labels
    else:
        meta.pop("labels", None)
    return obj


def _by_name(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): _normalise(o) for o in objs}


def test_chart_with_default_values_renders_what_the_kustomize_base_ships() -> None:
    chart = _by_name(_helm())
    base = _by_name(_render(str(ROOT / "bin" / "kustomize"), "build", str(ROOT / "manifests" / "base")))
    base.pop(("Namespace", "opensds-system"))  # helm install --create-namespace makes it
    assert sorted(chart) == sorted(base)
    for key, obj in base.items():
        assert chart[key] == obj, f"{key} differs between charts/opensds and manifests/base"


def test_chart_crds_are_the_project_crds() -> None:
    names = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert names == sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    _same, mismatch, errors = filecmp.cmpfiles(ROOT / "crds", CHART / "crds", names, shallow=False)
    assert not mismatch and not errors, f"copy crds/*.yaml to charts/opensds/crds/: {mismatch + errors}"


def test_values_create_backends_and_profiles_and_drop_optional_sidecars() -> None:
    objs = _helm("--set", "backends[0].name=local-file-node-1", "--set", "backends[0].spec.driver=file",
                 "--set", "profiles[0].name=fast", "--set", "profiles[0].spec.storageType=block",
                 "--set", "sidecars.snapshotter.enabled=false", "--set", "logLevel=debug",
                 "--set", "image.tag=9.9.9")
    kinds = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    assert kinds[("StorageBackend", "local-file-node-1")]["spec"] == {"driver": "file"}
    assert kinds[("StorageProfile", "fast")]["spec"] == {"storageType": "block"}
    controller = kinds[("Deployment", "opensds-csi-controller")]["spec"]["template"]["spec"]
    assert [c["name"] for c in controller["containers"]] == ["plugin", "csi-provisioner", "csi-attacher", "csi-resizer"]
    assert controller["containers"][0]["image"] == "opensds/opensds-k8s:9.9.9"
    assert "--verbose" in controller["containers"][0]["command"]


def test_installing_outside_opensds_system_is_refused_with_the_command_to_use() -> None:
    result = subprocess.run([str(ROOT / "bin" / "helm"), "template", "x", str(CHART), "-n", "default",
                             "--kube-version", "1.34.4"], capture_output=True, text=True)
    assert result.returncode != 0 and "-n opensds-system" in result.stderr


@pytest.mark.parametrize("values", [[], ["--set", "snapshotController.enabled=true"]])
def test_helm_lint_is_clean(values: list[str]) -> None:
    result = subprocess.run([str(ROOT / "bin" / "helm"), "lint", str(CHART), "-n", "opensds-system", *values],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout
