"""The real operator and dock run inside the VM against the host's kube-apiserver (through guestfwd)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client

G, V = "opensds.io", "v1alpha1"
MiB = 2**20
SCRATCH = Path(os.environ.get("OPENSDS_VM_SCRATCH", ".vm"))
KUBECONFIG = SCRATCH / "kubeconfig"


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
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
        self.log = open(SCRATCH / f"{backend}.log", "ab")  # noqa: SIM115
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, which: str) -> None:
        args = ([str(self.bindir / "opensds-operator")] if which == "operator" else
                [str(self.bindir / "opensds-dock"), "--backend", self.backend, "--capacity-interval", "5"])
        self.procs[which] = subprocess.Popen(args, env=self.env, stdout=self.log, stderr=self.log)

    def stop(self, which: str) -> None:
        proc = self.procs.pop(which)
        proc.terminate()
        proc.wait(20)
