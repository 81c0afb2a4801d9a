#!/usr/bin/env python3
"""Benchmark (not a test): create N Volumes on the file backend and time create -> Available.

Starts its own operator and dock (so their peak RSS belongs to this run) against the local
control plane (`hack/cluster.sh up` first), creates N Volumes from a few client threads,
follows them with a watch, and prints median/p95 latency, throughput, and the peak RSS
(VmHWM) of the operator and the dock. Then deletes everything and times that too.

    .venv/bin/python bench/volumes.py [-n 200] [--size 64Mi] [--clients 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parent.parent
KUBECONFIG = ROOT / ".cluster" / "admin.kubeconfig"
G, V = "opensds.io", "v1alpha1"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--size", default="64Mi")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    api = config.new_client_from_config(config_file=str(KUBECONFIG))
    crs, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    tag = uuid.uuid4().hex[:6]
    backend, profile, ns = f"bench-{tag}", f"bench-{tag}", f"bench-{tag}"
    workdir = Path(tempfile.mkdtemp(prefix="opensds-bench-"))
    env = {**os.environ, "KUBECONFIG": str(KUBECONFIG)}
    venv_bin = Path(sys.executable).parent
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    crs.create_cluster_custom_object(G, V, "storagebackends", {
        "apiVersion": f"{G}/{V}", "kind": "StorageBackend", "metadata": {"name": backend},
        "spec": {"driver": "file", "nodeName": "bench", "maxOverSubscriptionRatio": 100,
                 "parameters": {"path": str(workdir / "backend"), "capacity": "100Gi"}}})
    crs.create_cluster_custom_object(G, V, "storageprofiles", {
        "apiVersion": f"{G}/{V}", "kind": "StorageProfile", "metadata": {"name": profile},
        "spec": {"storageType": "block", "accessProtocol": "local"}})
    logs = open(workdir / "components.log", "ab")  # noqa: SIM115
    operator = subprocess.Popen([str(venv_bin / "opensds-operator")], env=env, stdout=logs, stderr=logs)
    dock = subprocess.Popen([str(venv_bin / "opensds-dock"), "--backend", backend], env=env, stdout=logs,
                            stderr=logs)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = crs.get_cluster_custom_object(G, V, "storagebackends", backend).get("status") or {}
            if any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])):
                break
            time.sleep(0.2)
        created: dict[str, float] = {}
        available: dict[str, float] = {}
        scheduled: dict[str, float] = {}
        done = threading.Event()

        def follow() -> None:
            w = watch.Watch()
            for event in w.stream(crs.list_namespaced_custom_object, G, V, ns, "volumes", timeout_seconds=600):
                obj = event["object"]
                name = obj["metadata"]["name"]
                if obj["spec"].get("backend") and name not in scheduled:
                    scheduled[name] = time.monotonic()
                if (obj.get("status") or {}).get("phase") == "Available" and name not in available:
                    available[name] = time.monotonic()
                    if len(available) == args.n:
                        w.stop()
            done.set()

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        time.sleep(0.5)

        def make(i: int) -> None:
            name = f"v{i:04d}"
            created[name] = time.monotonic()
            crs.create_namespaced_custom_object(G, V, ns, "volumes", {
                "apiVersion": f"{G}/{V}", "kind": "Volume", "metadata": {"name": name},
                "spec": {"size": args.size, "profile": profile}})

        start = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(make, range(args.n)))
        if not done.wait(600):
            raise SystemExit(f"only {len(available)}/{args.n} Available after 600 s")
        total = max(available.values()) - start
        latencies = [available[n] - created[n] for n in created]
        to_scheduled = [scheduled[n] - created[n] for n in created]
        to_available = [available[n] - scheduled[n] for n in created]
        op_rss, dock_rss = peak_rss_mib(operator.pid), peak_rss_mib(dock.pid)

        start_delete = time.monotonic()
        crs.delete_collection_namespaced_custom_object(G, V, ns, "volumes")
        while crs.list_namespaced_custom_object(G, V, ns, "volumes")["items"]:
            time.sleep(0.2)
        delete_total = time.monotonic() - start_delete
        leftovers = list((workdir / "backend" / "volumes").glob("*"))
        print(f"volumes: {args.n} x {args.size}, {args.clients} client threads, file backend")
        print(f"create -> Available: median {statistics.median(latencies):.2f} s, p95 {pct(latencies, 0.95):.2f} s, "
              f"max {max(latencies):.2f} s")
        print(f"  of which create -> Scheduled (operator): median {statistics.median(to_scheduled):.2f} s, "
              f"Scheduled -> Available (dock): median {statistics.median(to_available):.2f} s")
        print(f"all {args.n} Available in {total:.1f} s ({args.n / total:.1f} volumes/s)")
        print(f"all {args.n} deleted (CRs and files) in {delete_total:.1f} s; backing files left: {len(leftovers)}")
        print(f"peak RSS: operator {op_rss:.0f} MiB, dock {dock_rss:.0f} MiB")
    finally:
        crs.delete_cluster_custom_object(G, V, "storageprofiles", profile)
        crs.delete_cluster_custom_object(G, V, "storagebackends", backend)
        core.delete_namespace(ns)
        time.sleep(2)  # let the operator release the backend and profile finalizers
        for proc in (operator, dock):
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
