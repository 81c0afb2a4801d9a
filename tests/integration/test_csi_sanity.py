"""csi-sanity (kubernetes-csi/csi-test, pinned) against our controller and node plugins.

csi-sanity reads the plugin capabilities from the *node* endpoint's Identity service and skips
every controller call unless it advertises CONTROLLER_SERVICE, so it runs against one process
serving both roles (`--role all`, as single-node setups deploy it); the sidecar tests use
separate controller and node processes.

Volumes are real: the controller's CRs are scheduled by the real operator, made by the real
dock in the file backend, and the node plugin attaches them through loop devices, formats
and mounts them on this host. Skipped specs are listed (with the reason) in the README.
"""
from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from opensds_csi.mounts import mounts

from .conftest import NODE, ROOT, ZONE, ZONE_KEY, CsiPlugin, Stack, _spawn, wait_for_socket

MIB = 1 << 20


@pytest.mark.usefixtures("loop_devices")  # root and loop devices, or a failure naming them
@pytest.mark.timeout(900)
def test_csi_sanity_passes_against_controller_and_node(csi_plugin: CsiPlugin, stack: Stack, tmp_path: Path) -> None:
    venv_bin = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
    socket = csi_plugin.dir / "sanity.sock"
    plugin = _spawn([str(venv_bin / "opensds-csi"), "--role", "all", "--namespace", "opensds-system",
                     "--node-id", NODE, "--topology", f"{ZONE_KEY}={ZONE}", "--state-dir", str(tmp_path / "state"),
                     "--local-root", str(stack.backend_dir), "--endpoint", f"unix://{socket}"],
                    csi_plugin.dir / "csi-sanity-plugin.log", csi_plugin.kubeconfig)
    try:
        wait_for_socket(socket, plugin)
        run_sanity(f"unix://{socket}", csi_plugin.profile, tmp_path)
    finally:
        plugin.terminate()
        plugin.wait(10)
        leftovers = [m for m in mounts() if m.startswith(str(tmp_path))]
        for target in sorted(leftovers, reverse=True):
            subprocess.run(["umount", "-l", target], check=False)
        assert leftovers == [], "csi-sanity's cleanup left these mounted"


def run_sanity(endpoint: str, profile: str, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"profile": profile}))
    report = tmp_path / "junit.xml"
    result = subprocess.run([
        str(ROOT / "bin" / "csi-sanity"),
        f"-csi.endpoint={endpoint}",
        f"-csi.testvolumeparameters={params}",
        f"-csi.testsnapshotparameters={params}",
        f"-csi.testvolumesize={64 * MIB}",
        f"-csi.testvolumeexpandsize={128 * MIB}",
        f"-csi.mountdir={tmp_path / 'mount'}",
        f"-csi.stagingdir={tmp_path / 'staging'}",
        f"--ginkgo.junit-report={report}",
        "--ginkgo.no-color",
    ], capture_output=True, text=True, timeout=840)
    summary = re.findall(r"(?:Ran \d+ of \d+ Specs.*|\d+ Passed \| \d+ Failed \| \d+ Pending \| \d+ Skipped)",
                         result.stdout)
    print("\n".join(summary))
    skipped = sorted({case.get("name", "") for case in ET.parse(report).getroot().iter("testcase")
                      if case.find("skipped") is not None})
    print("skipped:\n  " + "\n  ".join(skipped))
    assert result.returncode == 0, result.stdout[-20000:]
    assert re.search(r"\d+ Passed \| 0 Failed", result.stdout), result.stdout[-5000:]
