"""I/O limits: from the profile to publish_context, and from there to an io.max line on the pod's cgroup."""
from __future__ import annotations

from pathlib import Path

from opensds_csi import iolimits
from opensds_operator.qos import GiB, IoLimits, volume_limits


def test_absolute_limits_pass_through() -> None:
    assert volume_limits({"provisioning": {"maxIOPS": 500, "maxBWS": 10_000_000}}, 5 * GiB) == IoLimits(500, 10_000_000)


def test_per_gib_limits_scale_with_size_rounded_up_and_the_lower_cap_wins() -> None:
    spec = {"provisioning": {"iopsPerGiB": 100, "maxIOPS": 1000, "bwsPerGiB": 1_000_000}}
    assert volume_limits(spec, 3 * GiB + 1) == IoLimits(400, 4_000_000)
    assert volume_limits(spec, 20 * GiB).iops == 1000


def test_no_limits_adds_nothing_to_the_context() -> None:
    limits = volume_limits({"provisioning": {"type": "thin"}}, GiB)
    assert not limits and limits.as_context() == {}


def test_context_round_trip_and_garbage_means_unlimited() -> None:
    assert IoLimits.from_context(IoLimits(300, None).as_context()) == IoLimits(300, None)
    assert IoLimits.from_context({"maxIOPS": "-5", "maxBPS": "lots"}) == IoLimits()


def test_io_max_line_caps_both_directions_and_lifting_sets_max() -> None:
    assert iolimits.limit_line("259:1", IoLimits(300, None)) == "259:1 riops=300 wiops=300 rbps=max wbps=max"
    assert iolimits.limit_line("7:0", IoLimits()) == "7:0 riops=max wiops=max rbps=max wbps=max"


def test_pod_cgroup_is_found_under_both_kubelet_cgroup_drivers(tmp_path: Path) -> None:
    uid = "0b6d1f0e-3c1a-4e55-9d2b-7f3f2f1c9a10"
    cgroupfs = tmp_path / "a" / "kubepods" / "burstable" / f"pod{uid}"
    systemd = (tmp_path / "b" / "kubepods.slice" / "kubepods-besteffort.slice"
               / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice")
    for path in (cgroupfs, systemd):
        path.mkdir(parents=True)
    assert iolimits.pod_cgroup(uid, tmp_path / "a") == cgroupfs
    assert iolimits.pod_cgroup(uid, tmp_path / "b") == systemd
    assert iolimits.pod_cgroup("other", tmp_path / "a") is None


def test_applying_enables_the_io_controller_down_the_path(tmp_path: Path) -> None:
    pod = tmp_path / "kubepods" / "podx"
    pod.mkdir(parents=True)
    for cgroup in (tmp_path, tmp_path / "kubepods"):
        (cgroup / "cgroup.subtree_control").write_text("cpu memory\n")
    iolimits.apply(pod, "/dev/null", IoLimits(100, 2048), root=tmp_path)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+io"
    assert (tmp_path / "kubepods" / "cgroup.subtree_control").read_text() == "+io"
    assert (pod / "io.max").read_text() == "1:3 riops=100 wiops=100 rbps=2048 wbps=2048"
