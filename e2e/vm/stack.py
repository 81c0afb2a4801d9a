"""The real operator and dock run inside the VM against the host's kube-apiserver (through guestfwd)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubernetes import client

G, V = "opensds.io", "v1alpha1"
MiB = 2**20
SCRATCH = Path(os.environ.get("OPENSDS_VM_SCRATCH", ".vm"))
KUBECONFIG = SCRATCH / "kubeconfig"
LOGS = Path(os.environ.get("OPENSDS_VM_RUN_DIR", SCRATCH))  # this VM run's log directory (hack/vm.sh)


# Timeouts in the tests are what an idle host needs. Under TCG on a 2-core host shared with other
# builds everything is several times slower: starting the operator and a dock (Python importing
# kopf and the Kubernetes client over 9p) took 3 minutes in one run, past a 120 s wait. A wait
# returns as soon as its condition holds, so a larger factor costs a green run nothing.
SLOWDOWN = float(os.environ.get("OPENSDS_E2E_SLOWDOWN", "3"))


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    timeout *= SLOWDOWN
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def digest(device: str, length: int) -> str:
    with open(device, "rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


class Stack:
    """The real operator and one dock inside the VM, as processes a test can stop and restart."""

    def __init__(self, crs: client.CustomObjectsApi, ns: str, backend: str) -> None:
        self.crs, self.ns, self.backend = crs, ns, backend
        self.vg = ""
        self.env = {**os.environ, "KUBECONFIG": str(KUBECONFIG)}
        self.bindir = Path(sys.executable).parent
        self.log = open(LOGS / f"{backend}.log", "ab")  # noqa: SIM115
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.dock_args: list[str] = []  # extra flags for the next dock start (e.g. a short quarantine)

    def start(self, which: str) -> None:
        args = ([str(self.bindir / "opensds-operator")] if which == "operator" else
                [str(self.bindir / "opensds-dock"), "--backend", self.backend, "--capacity-interval", "5",
                 *self.dock_args])
        self.procs[which] = subprocess.Popen(args, env=self.env, stdout=self.log, stderr=self.log)

    def stop(self, which: str) -> None:
        proc = self.procs.pop(which)
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:  # under TCG a dock can take longer to wind down
            proc.kill()
            proc.wait(20)

    def kill(self, which: str) -> None:
        """SIGKILL, as a crash or a node reboot would end it."""
        proc = self.procs.pop(which)
        proc.kill()
        proc.wait(20)


@contextlib.contextmanager
def running_stack(kind: str, backend_spec: Callable[[str], dict[str, Any]],
                  secrets: dict[str, dict[str, str]] | None = None) -> Iterator[Stack]:
    """A namespace (with `secrets`), a StorageBackend `<kind>-<tag>` and its operator + dock, torn down after."""
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(KUBECONFIG))
    crs, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    tag = uuid.uuid4().hex[:6]
    backend, ns = f"{kind}-{tag}", f"e2e-{kind}-{tag}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    for name, data in (secrets or {}).items():
        core.create_namespaced_secret(ns, client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=data))
    crs.create_cluster_custom_object(G, V, "storagebackends", {
        "apiVersion": f"{G}/{V}", "kind": "StorageBackend", "metadata": {"name": backend}, "spec": backend_spec(ns)})
    stack = Stack(crs, ns, backend)
    stack.start("operator")
    stack.start("dock")
    try:
        yield stack
    finally:
        crs.delete_cluster_custom_object(G, V, "storagebackends", backend)
        core.delete_namespace(ns)
        time.sleep(3)
        for which in list(stack.procs):
            stack.stop(which)
