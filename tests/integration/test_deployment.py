"""The product deployed as users deploy it, onto a real kubelet node, with pods on PVCs.

A control plane of its own (so nothing else in the test session shares it) and one node from
hack/node.sh (containerd + runc + kubelet in their own network and mount namespaces), the images
`make images` built, then, in order:
1. `make up`'s script (hack/up.sh): the Helm chart from the local images, a pod writing to a PVC,
   deleted and re-created, reading the same data; a snapshot restored into a second pod; online
   expansion while the pod runs.
2. `helm upgrade` rolls every component while the pod keeps its mounted volume and does I/O.
3. The node plugin restarted, then kubelet restarted, with the volume mounted: I/O goes on, the
   plugin re-registers, a pod started afterwards mounts a new volume.
4. `helm uninstall` leaves the CRDs, backends/profiles and the volumes' data, nothing else.
5. `kubectl apply -k manifests/base` deploys the same product again, which serves the volume
   made by the chart's install (a new pod reads the same data) and passes the same demo.
The tests share one deployment and run in file order.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / ".images"
NAMESPACE = "opensds-system"
DRIVER = "block.csi.opensds.io"
ENV = {
    **os.environ,
    "OPENSDS_CLUSTER_DIR": str(ROOT / ".cluster-deploy"),
    "OPENSDS_API_PORT": "27443",
    "OPENSDS_ETCD_PORT": "28790",
    "OPENSDS_NODES_DIR": str(ROOT / ".nodes-deploy"),
}
KUBECONFIG = Path(ENV["OPENSDS_CLUSTER_DIR"]) / "admin.kubeconfig"


@dataclass(frozen=True)
class Deployment:
    up_output: str
    facts: dict[str, str] = field(default_factory=dict)  # what a later test checks again

    @property
    def demo(self) -> str:
        """The namespace hack/up.sh ran its demo pods in."""
        match = re.search(r"the demo ran in namespace (\S+)", self.up_output)
        assert match, self.up_output
        return match.group(1)

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run([str(ROOT / "bin" / "kubectl"), "--kubeconfig", str(KUBECONFIG), *args],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def helm(self, *args: str) -> str:
        result = subprocess.run([str(ROOT / "bin" / "helm"), "--kubeconfig", str(KUBECONFIG), *args],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"helm {' '.join(args)}: {result.stderr}"
        return result.stdout

    def get(self, *args: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self.kubectl("get", "-o", "json", *args))  # type: ignore[no-any-return]

    def pods(self, label: str) -> list[dict]:  # type: ignore[type-arg]
        return self.get("pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/name={label}")["items"]  # type: ignore[no-any-return]

    def in_pod(self, pod: str, script: str) -> str:
        return self.kubectl("exec", "-n", self.demo, pod, "--", "sh", "-c", script).strip()

    def md5(self, pod: str) -> str:
        return self.in_pod(pod, "md5sum < /data/payload | cut -d' ' -f1")

    def wait_ready(self, *args: str, timeout: int = 180) -> None:
        self.kubectl("wait", "--for", "condition=Ready", f"--timeout={timeout}s", *args, timeout=timeout + 10)


def _sh(*args: str) -> None:
    subprocess.run(["bash", *args], check=True, env=ENV, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    assert (IMAGES / "opensds-k8s.tar").exists(), "the project image is missing: run `make images`"
    _sh("hack/node.sh", "down")
    _sh("hack/cluster.sh", "reset")
    shutil.rmtree(ENV["OPENSDS_NODES_DIR"], ignore_errors=True)  # a fresh node: nothing from a run before
    try:
        result = subprocess.run(["bash", "hack/up.sh"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"hack/up.sh failed:\n{result.stdout}\n{result.stderr[-4000:]}"
        yield Deployment(result.stdout + result.stderr)
    finally:
        if os.environ.get("OPENSDS_KEEP_CLUSTER") != "1":
            _sh("hack/node.sh", "down")
            _sh("hack/cluster.sh", "reset")


def _all_ready(d: Deployment) -> dict[str, list[str]]:
    """Component -> the names of its pods, each Running with every container ready."""
    names = {}
    for component in ("opensds-operator", "opensds-csi-controller", "opensds-csi-node", "opensds-dock"):
        pods = d.pods(component)
        assert pods, f"no {component} pod"
        for pod in pods:
            statuses = pod["status"].get("containerStatuses") or []
            assert statuses and all(s["ready"] for s in statuses), f"{pod['metadata']['name']} not ready"
        names[component] = sorted(p["metadata"]["name"] for p in pods)
    return names


def test_make_up_serves_pods_on_pvcs_through_the_chart(deployment: Deployment) -> None:
    d = deployment
    _all_ready(d)
    for pod in d.get("pods", "-n", NAMESPACE)["items"]:  # the shipped ServiceAccounts, not default
        assert pod["spec"]["serviceAccountName"] != "default", pod["metadata"]["name"]
    out = d.up_output
    assert "the pod re-created on its PVC reads the same data" in out, out
    assert "the snapshot restored into a second PVC: its pod reads the same data" in out
    assert re.search(r"online expansion: the pod's filesystem grew from \d+ KiB to \d+ KiB", out)
    # kubelet, not a stand-in, wrote the CSINode from the plugin's registration.
    csinode = d.get("csinode", "node-1")
    assert [drv["name"] for drv in csinode["spec"]["drivers"]] == [DRIVER]
    assert d.md5("sample-writer") == d.md5("sample-reader")
    d.facts["payload"] = d.md5("sample-writer")


def test_helm_upgrade_rolls_every_component_while_the_pod_keeps_its_volume(deployment: Deployment) -> None:
    d = deployment
    before = _all_ready(d)
    writer_uid = d.get("pod", "-n", d.demo, "sample-writer")["metadata"]["uid"]
    payload = d.md5("sample-writer")
    d.helm("upgrade", "opensds", str(ROOT / "charts" / "opensds"), "-n", NAMESPACE, "--reuse-values",
           "--set", "logLevel=debug", "--wait", "--timeout", "300s")
    deadline = time.monotonic() + 180
    while True:  # --wait returns once the new pods are ready; old ones may still be terminating
        try:
            after = _all_ready(d)
            if all(not set(after[c]) & set(before[c]) for c in before):
                break
        except AssertionError:
            pass
        assert time.monotonic() < deadline, f"components did not roll: {before} -> {d.pods('opensds-csi-node')}"
        time.sleep(1)
    assert d.get("pod", "-n", d.demo, "sample-writer")["metadata"]["uid"] == writer_uid
    assert d.md5("sample-writer") == payload
    assert d.in_pod("sample-writer", "echo after-upgrade > /data/io && sync && cat /data/io") == "after-upgrade"


def test_node_plugin_and_kubelet_restarts_keep_mounted_volumes_working(deployment: Deployment) -> None:
    d = deployment
    payload = d.md5("sample-writer")
    old = d.pods("opensds-csi-node")[0]["metadata"]["name"]
    d.kubectl("delete", "pod", "-n", NAMESPACE, old, "--wait=true")
    deadline = time.monotonic() + 120
    while not [p for p in d.pods("opensds-csi-node") if p["metadata"]["name"] != old
               and all(s["ready"] for s in p["status"].get("containerStatuses") or [{"ready": False}])]:
        assert time.monotonic() < deadline, "node plugin pod not back"
        time.sleep(1)
    assert d.in_pod("sample-writer", "echo after-plugin-restart > /data/io && sync && cat /data/io") == \
        "after-plugin-restart"
    _sh("hack/node.sh", "restart-kubelet", "node-1")
    deadline = time.monotonic() + 120
    while True:  # until the new kubelet serves exec again (the pod itself never stopped)
        try:
            d.in_pod("sample-writer", "true")
            break
        except AssertionError:
            assert time.monotonic() < deadline, "kubelet does not serve exec after its restart"
            time.sleep(1)
    assert d.in_pod("sample-writer", "echo after-kubelet-restart > /data/io && sync && cat /data/io") == \
        "after-kubelet-restart"
    assert d.md5("sample-writer") == payload
    # The plugin is registered again, and a new pod mounts a new volume.
    csinode = d.get("csinode", "node-1")
    assert [drv["name"] for drv in csinode["spec"]["drivers"]] == [DRIVER]
    manifest = {
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": "after-restart", "namespace": d.demo},
             "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local-thin",
                      "resources": {"requests": {"storage": "512Mi"}}}},  # xfs: 300 MiB at least
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "after-restart", "namespace": d.demo},
             "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                 "name": "app", "image": "opensds/busybox:1.35.0", "imagePullPolicy": "IfNotPresent",
                 "command": ["sh", "-c", "echo ok > /data/f && exec sleep 100000"],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "after-restart"}}]}},
        ]}
    subprocess.run([str(ROOT / "bin" / "kubectl"), "--kubeconfig", str(KUBECONFIG), "apply", "-f", "-"],
                   input=json.dumps(manifest), text=True, check=True, capture_output=True)
    d.wait_ready("-n", d.demo, "pod/after-restart")
    assert d.in_pod("after-restart", "cat /data/f") == "ok"
    d.kubectl("delete", "-n", d.demo, "pod/after-restart", "pvc/after-restart", "--wait=true")


def test_helm_uninstall_leaves_only_the_crds_and_the_data(deployment: Deployment) -> None:
    d = deployment
    d.kubectl("delete", "-n", d.demo, "pod", "sample-writer", "sample-reader", "--wait=true")
    deadline = time.monotonic() + 120
    while d.get("volumeattachments")["items"]:  # detached while the attacher still runs
        assert time.monotonic() < deadline, "volumes still attached after their pods went"
        time.sleep(1)
    volumes_before = {v["metadata"]["name"] for v in d.get("volumes.opensds.io", "-n", NAMESPACE)["items"]}
    assert volumes_before
    d.helm("uninstall", "opensds", "-n", NAMESPACE, "--wait", "--timeout", "180s")
    deadline = time.monotonic() + 120
    while d.get("pods", "-n", NAMESPACE)["items"]:
        assert time.monotonic() < deadline, "pods left after helm uninstall"
        time.sleep(1)
    for kind in ("deployments", "daemonsets", "serviceaccounts", "roles", "rolebindings"):
        left = [o["metadata"]["name"] for o in d.get(kind, "-n", NAMESPACE)["items"]
                if o["metadata"]["name"] != "default" and not o["metadata"]["name"].startswith("kube-root-ca")]
        assert not left, f"{kind} left: {left}"
    for kind in ("clusterroles", "clusterrolebindings", "csidrivers", "validatingadmissionpolicies"):
        left = [o["metadata"]["name"] for o in d.get(kind)["items"] if "opensds" in o["metadata"]["name"]
                or o["metadata"]["name"] == DRIVER]
        assert not left, f"{kind} left: {left}"
    crds = {c["metadata"]["name"] for c in d.get("crds")["items"]}
    assert {"volumes.opensds.io", "storagebackends.opensds.io", "storageprofiles.opensds.io"} <= crds
    assert {v["metadata"]["name"] for v in d.get("volumes.opensds.io", "-n", NAMESPACE)["items"]} == volumes_before
    images = list((Path(ENV["OPENSDS_NODES_DIR"]) / "node-1" / "opensds" / "file").rglob("vol-*"))
    assert images, "the volumes' data left the node"


def test_kustomize_base_deploys_the_same_product_and_serves_the_kept_volume(deployment: Deployment) -> None:
    d = deployment
    d.kubectl("apply", "-k", str(ROOT / "manifests" / "snapshot-controller"))
    d.kubectl("apply", "-k", str(ROOT / "manifests" / "base"))
    deadline = time.monotonic() + 240
    while True:
        try:
            _all_ready(d)
            break
        except AssertionError:
            assert time.monotonic() < deadline, d.kubectl("get", "pods", "-A", "-o", "wide")
            time.sleep(2)
    manifest = ROOT / "manifests" / "samples" / "pod-writer.yaml"
    d.kubectl("apply", "-n", d.demo, "-f", str(manifest))  # the writer keeps an existing payload
    d.wait_ready("-n", d.demo, "pod/sample-writer")
    assert d.md5("sample-writer") == d.facts["payload"]
    # And the whole demo (pod re-creation, snapshot restore, online expansion) on this deployment.
    demo = subprocess.run(["bash", "hack/demo.sh"], env={**ENV, "KUBECONFIG": str(KUBECONFIG)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, f"hack/demo.sh on the kustomize deployment:\n{demo.stdout}\n{demo.stderr}"
    out = demo.stdout + demo.stderr
    assert "the pod re-created on its PVC reads the same data" in out
    assert "the snapshot restored into a second PVC: its pod reads the same data" in out
    assert "online expansion: the pod's filesystem grew" in out
