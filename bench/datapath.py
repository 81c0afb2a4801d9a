"""Data-path benchmark, run inside the real-kernel VM by bench/datapath.sh (not a test).

fio (JSON output) on one thin LV three ways: the LV device directly, through the NVMe-oF/TCP
export (kernel nvmet -> nvme-tcp on loopback) and through the iSCSI export (LIO -> iscsi_tcp),
each connected by the CSI node plugin's own connectors. Then the profile QoS path: the node
plugin publishes the NVMe/TCP volume with maxIOPS / maxBPS in publish_context into a pod
cgroup, and fio runs inside that cgroup, as a pod's process would.

Every figure comes from one run and is printed beside its ratio to the direct LV, so the
machine's speed (QEMU TCG here) cancels out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from e2e.vm import kernel
from e2e.vm.nodeplugin import Node, capability, stage, unstage
from opensds_csi.connectors.iscsi import IscsiConnector
from opensds_csi.connectors.nvme_tcp import NvmeTcpConnector
from opensds_csi.iolimits import POD_UID_KEY
from opensds_operator.drivers.lvm import LvmDriver
from opensds_operator.exports.lio import LioExporter
from opensds_operator.exports.nvmet import NvmetExporter
from opensds_operator.qos import IoLimits

MiB = 2**20
JOBS = {  # name -> fio arguments
    "randread 4k qd32 (IOPS)": ["--rw=randread", "--bs=4k", "--iodepth=32"],
    "randwrite 4k qd32 (IOPS)": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "seqread 1M qd8 (MiB/s)": ["--rw=read", "--bs=1M", "--iodepth=8"],
}


def fio(device: str, job: list[str], runtime: int, cgroup: Path | None = None) -> float:
    """IOPS for 4k jobs, MiB/s for 1M jobs (O_DIRECT, libaio, time based)."""
    args = ["fio", "--name=bench", f"--filename={device}", "--direct=1", "--ioengine=libaio",
            "--time_based", f"--runtime={runtime}", "--ramp_time=2", "--output-format=json", *job]
    if cgroup is not None:  # join the pod cgroup, then become fio
        args = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "fio-in-pod", *args]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    result = json.loads(out[out.index("{"):])["jobs"][0]
    side = result["write"] if "--rw=randwrite" in job else result["read"]
    return float(side["bw_bytes"]) / MiB if "--bs=1M" in job else float(side["iops"])


def run_all(device: str, runtime: int, cgroup: Path | None = None, jobs: list[str] | None = None) -> dict[str, float]:
    return {name: fio(device, JOBS[name], runtime, cgroup) for name in (jobs or list(JOBS))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job (after 2 s ramp)")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--out", default="", help="also write the results here as JSON")
    args = parser.parse_args()

    kernel.start_nvmet()
    results: dict[str, dict[str, float]] = {}
    with kernel.thin_pool(size="2G", pool_size="1G") as (vg, pool), kernel.lio_and_iscsid():
        driver = LvmDriver(vg, pool)
        uid = str(uuid.uuid4())
        backend_id = f"vol-{uid}"
        lv = driver.create_volume(backend_id, pool, args.size_mib * MiB, thin=True).path
        assert lv
        # Allocate every thin block first: reads of unprovisioned blocks would cost nothing.
        kernel.sh("dd", "if=/dev/urandom", f"of={lv}", "bs=1M", f"count={args.size_mib}", "oflag=direct")
        nvmet = NvmetExporter([("127.0.0.1", 4420)])
        lio = LioExporter([("127.0.0.1", 3260)], dbroot=Path("/run/opensds-target"))
        try:
            release = kernel.sh("uname", "-r").strip()
            print(f"fio {args.runtime}s per job on a {args.size_mib} MiB thin LV; kernel {release}", flush=True)
            results["LV direct"] = run_all(lv, args.runtime)
            paths: dict[str, tuple[Callable[[], dict[str, str]], NvmeTcpConnector | IscsiConnector]] = {
                "NVMe/TCP": (lambda: nvmet.export(backend_id, lv, uid, ["bench"]), NvmeTcpConnector("bench")),
                "iSCSI": (lambda: lio.export(backend_id, lv, uid, ["bench"]), IscsiConnector("bench")),
            }
            for name, (export, connector) in paths.items():
                context = export()
                device = connector.attach(backend_id, context, {})
                try:
                    results[name] = run_all(device, args.runtime)
                finally:
                    connector.detach(backend_id, context, device)
            results.update(qos_runs(backend_id, lv, uid, nvmet, results["NVMe/TCP"], args.runtime))
        finally:
            nvmet.unexport(backend_id)
            lio.unexport(backend_id)
            driver.delete_volume(backend_id, pool)
    report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def qos_runs(backend_id: str, lv: str, uid: str, nvmet: NvmetExporter, unlimited: dict[str, float],
             runtime: int) -> dict[str, dict[str, float]]:
    """NVMe/TCP published by the node plugin with limits at about a quarter of what it did unlimited."""
    iops = max(50, round(unlimited["randread 4k qd32 (IOPS)"] / 4, -1))
    bps = max(4 * MiB, round(unlimited["seqread 1M qd8 (MiB/s)"] / 4) * MiB)
    limits = IoLimits(int(iops), int(bps))
    context = {**nvmet.export(backend_id, lv, uid, ["bench"]), **limits.as_context()}
    pod_uid = str(uuid.uuid4())
    cgroup = kernel.pod_cgroup(pod_uid)
    node = Node("bench")
    try:
        target = stage(node, backend_id, context, capability(None), volume_context={POD_UID_KEY: pod_uid})
        print(f"io.max of the pod cgroup: {(cgroup / 'io.max').read_text().strip()}", flush=True)
        measured = run_all(str(target), runtime, cgroup)
        unstage(node, backend_id)
    finally:
        node.close()
        time.sleep(0.5)
        cgroup.rmdir()
    return {f"NVMe/TCP, maxIOPS={limits.iops} maxBPS={limits.bps // MiB}MiB": measured,
            "limit": {"randread 4k qd32 (IOPS)": float(limits.iops or 0),
                      "randwrite 4k qd32 (IOPS)": float(limits.iops or 0),
                      "seqread 1M qd8 (MiB/s)": float((limits.bps or 0) / MiB)}}


def report(results: dict[str, dict[str, float]]) -> None:
    direct = results["LV direct"]
    names = list(JOBS)
    print(f"\n{'path':<44}" + "".join(f"{n:>28}" for n in names))
    for path, figures in results.items():
        if path == "limit":
            continue
        cells = [f"{figures[n]:10.1f} ({figures[n] / direct[n]:4.2f}x)" for n in names]
        print(f"{path:<44}" + "".join(f"{c:>28}" for c in cells))
    limit = results["limit"]
    limited = next(v for k, v in results.items() if k.startswith("NVMe/TCP, max"))
    for n in names:
        ratio = limited[n] / limit[n]
        print(f"QoS {n}: {limited[n]:.1f} measured / {limit[n]:.1f} limit = {ratio:.3f} "
              f"({'holds' if ratio <= 1.1 else 'EXCEEDED'}: <= 1.1)")


if __name__ == "__main__":
    sys.exit(main())
