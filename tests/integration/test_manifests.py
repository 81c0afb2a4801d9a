"""The shipped kustomize manifests (installed after `kubectl apply -f crds/`) are accepted by a real apiserver."""
from __future__ import annotations

import subprocess

from .conftest import ROOT, Cluster


def test_kustomize_output_passes_server_side_dry_run(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "manifests" / "base" / "namespace.yaml"))
    rendered = subprocess.run([str(ROOT / "bin" / "kustomize"), "build", str(ROOT / "manifests" / "base")],
                              check=True, capture_output=True, text=True).stdout
    result = subprocess.run(
        [str(ROOT / "bin" / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "apply", "--server-side",
         "--dry-run=server", "-f", "-"], input=rendered, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "deployment.apps/opensds-operator serverside-applied (server dry run)" in result.stdout
    assert "daemonset.apps/opensds-dock serverside-applied (server dry run)" in result.stdout
    assert "deployment.apps/opensds-csi-controller serverside-applied (server dry run)" in result.stdout
    assert "daemonset.apps/opensds-csi-node serverside-applied (server dry run)" in result.stdout
    assert "csidriver.storage.k8s.io/block.csi.opensds.io serverside-applied (server dry run)" in result.stdout
