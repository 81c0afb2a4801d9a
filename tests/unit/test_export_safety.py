"""Target-side export safety (issue 9, items 7, 9 and 11): node names never become paths, network
exports authenticate by default and fail closed, generated keys are what NVMe and iSCSI accept,
and StorageClasses/VolumeSnapshotClasses of someone else are recognised as such."""
from __future__ import annotations

import base64
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest

from opensds_operator.api import (
    CHAP_MUTUAL_PASSWORD,
    CHAP_MUTUAL_USER,
    CHAP_PASSWORD,
    CHAP_USER,
    DHCHAP_CTRL_KEY,
    DHCHAP_HOST_KEY,
    MANAGED_BY,
    MANAGED_BY_LABEL,
)
from opensds_operator.credentials import (
    SECRET_NAME,
    chap_secret,
    dhchap_secret,
    dhchap_secret_valid,
    generate_node_stage_secret,
    generated_secret_body,
    node_stage_secret_ref,
)
from opensds_operator.drivers.base import DriverError, PermanentDriverError
from opensds_operator.drivers.file import FileDriver
from opensds_operator.exports.base import ExportAuth, node_host_nqn, node_iqn
from opensds_operator.handlers.dock import Dock
from opensds_operator.storageclass import (
    NODE_STAGE_SECRET_NAME,
    NODE_STAGE_SECRET_NAMESPACE,
    is_managed,
    snapshot_class,
    storage_class,
)

# ---------------------------------------------------------------- item 7: node names are not paths

HOSTILE_NODE_NAMES = ["x/../../tmp/PWNED", "../etc", "node/a", "", "Node-A", "-a", "a-", "a..b", "a b",
                      "a\nb", "a:b", "n" * 254]


@pytest.mark.parametrize("node", HOSTILE_NODE_NAMES)
def test_node_names_that_are_no_kubernetes_node_names_never_become_nqns_or_iqns(node: str) -> None:
    with pytest.raises(PermanentDriverError, match="not a Kubernetes node name"):
        node_host_nqn(node)
    with pytest.raises(PermanentDriverError, match="not a Kubernetes node name"):
        node_iqn(node)


def test_kubernetes_node_names_still_give_the_derived_identities() -> None:
    assert node_host_nqn("node-a") == "nqn.2024-11.io.opensds:node:node-a"
    assert node_iqn("worker-1.zone-b") == "iqn.2024-11.io.opensds:node:worker-1.zone-b"


def test_a_traversing_published_node_makes_no_directory_outside_the_nvmet_tree(tmp_path: Path) -> None:
    """The exporter refuses before it mkdirs anything named after the node."""
    from opensds_operator.exports.nvmet import NvmetExporter

    root = tmp_path / "nvmet"
    for part in ("subsystems", "ports", "hosts"):
        (root / part).mkdir(parents=True)
    with pytest.raises(PermanentDriverError):
        NvmetExporter([("127.0.0.1", 4420)], root=root).export("vol-x", "/dev/null", "u", ["x/../../../PWNED"])
    assert not (tmp_path / "PWNED").exists()
    assert [p for p in root.rglob("*") if p.is_dir()] == [root / "hosts", root / "ports", root / "subsystems"]


# ---------------------------------------------------------------- item 9: fail closed


def test_a_secret_lacking_the_protocols_keys_is_refused_naming_the_keys_not_the_values() -> None:
    with pytest.raises(PermanentDriverError, match=DHCHAP_HOST_KEY) as nvme:
        ExportAuth.from_secret({CHAP_USER: "u", CHAP_PASSWORD: "pw-value-1"}).require("nvmeof-tcp")
    assert "pw-value-1" not in str(nvme.value)
    with pytest.raises(PermanentDriverError, match=CHAP_PASSWORD) as iscsi:
        ExportAuth.from_secret({CHAP_USER: "u", DHCHAP_HOST_KEY: "DHHC-1:00:secret:"}).require("iscsi")
    assert "DHHC-1:00:secret:" not in str(iscsi.value)
    with pytest.raises(PermanentDriverError, match=CHAP_MUTUAL_PASSWORD):  # half a mutual pair
        ExportAuth.from_secret({CHAP_USER: "u", CHAP_PASSWORD: "p", CHAP_MUTUAL_USER: "t"}).require("iscsi")


def test_complete_secrets_and_protocols_without_target_auth_pass() -> None:
    full = ExportAuth.from_secret(generate_node_stage_secret())
    assert full.require("nvmeof-tcp") is full and full.require("iscsi") is full
    ExportAuth().require("local")
    ExportAuth().require("rbd")


class SecretsOnly:
    """The one API call _export_auth makes."""

    def __init__(self, secrets: dict[tuple[str, str], dict[str, str]]) -> None:
        self.secrets = secrets

    def secret_data(self, name: str, namespace: str) -> dict[str, str] | None:
        return self.secrets.get((namespace, name))


def _dock(tmp_path: Path, secrets: dict[tuple[str, str], dict[str, str]]) -> Dock:
    return Dock("b", FileDriver(str(tmp_path / "backend")), api=SecretsOnly(secrets))  # type: ignore[arg-type]


def _profile(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "gold"}, "spec": {"storageType": "block", **spec}}


def test_dock_refuses_to_export_when_the_profiles_secret_lacks_the_protocols_keys(tmp_path: Path) -> None:
    """The old dock exported without authentication then (an initiator claiming a node's NQN got in)."""
    dock = _dock(tmp_path, {("ops", "creds"): {CHAP_USER: "u", CHAP_PASSWORD: "p"}})
    profile = _profile(accessProtocol="nvmeof-tcp", nodeStageSecretRef={"name": "creds", "namespace": "ops"})
    with pytest.raises(PermanentDriverError, match=f"Secret ops/creds .*lacks {DHCHAP_HOST_KEY}"):
        dock._export_auth(profile)


def test_dock_authenticates_network_profiles_without_a_secret_with_the_generated_one(tmp_path: Path) -> None:
    generated = generate_node_stage_secret()
    dock = _dock(tmp_path, {("opensds-system", SECRET_NAME): generated})
    auth = dock._export_auth(_profile(accessProtocol="iscsi"))
    assert auth is not None and auth.chap_password == generated[CHAP_PASSWORD]
    assert dock._export_auth(_profile(accessProtocol="iscsi", unauthenticatedExports=True)) is None
    assert dock._export_auth(_profile(accessProtocol="local")) is None
    with pytest.raises(DriverError) as waiting:  # not generated yet: wait for the operator, never export open
        _dock(tmp_path, {})._export_auth(_profile(accessProtocol="nvmeof-tcp"))
    assert not isinstance(waiting.value, PermanentDriverError)


# ---------------------------------------------------------------- generated credentials


def test_generated_dhchap_secrets_have_the_nvme_representation_and_crc() -> None:
    for length in (32, 48, 64):
        key = dhchap_secret(length)
        prefix, version, encoded, end = key.split(":")
        raw = base64.b64decode(encoded)
        assert (prefix, version, end, len(raw)) == ("DHHC-1", "00", "", length + 4)
        assert raw[-4:] == zlib.crc32(raw[:-4]).to_bytes(4, "little")
        assert dhchap_secret_valid(key)
    assert dhchap_secret() != dhchap_secret()
    tampered = base64.b64decode(dhchap_secret().split(":")[2])
    assert not dhchap_secret_valid(f"DHHC-1:00:{base64.b64encode(bytes([tampered[0] ^ 1]) + tampered[1:]).decode()}:")


def test_generated_dhchap_secrets_agree_with_nvme_cli_both_ways() -> None:
    checked = subprocess.run(["nvme", "check-dhchap-key", "-k", dhchap_secret()], capture_output=True, text=True)
    assert checked.returncode == 0 and "Key is valid" in checked.stdout, checked.stdout + checked.stderr
    made = subprocess.run(["nvme", "gen-dhchap-key", "-n", "nqn.2024-11.io.opensds:node:n"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert dhchap_secret_valid(made)


def test_generated_secret_holds_every_key_both_protocols_need_and_chap_passwords_are_strong() -> None:
    data = generate_node_stage_secret()
    assert set(data) == {DHCHAP_HOST_KEY, DHCHAP_CTRL_KEY, CHAP_USER, CHAP_PASSWORD, CHAP_MUTUAL_USER,
                         CHAP_MUTUAL_PASSWORD}
    assert data[CHAP_PASSWORD] != data[CHAP_MUTUAL_PASSWORD] and chap_secret().isalnum()
    assert len(chap_secret()) >= 16  # 12..16 is the minimum some initiators insist on
    body = generated_secret_body("opensds-system")
    assert body["metadata"]["labels"] == {MANAGED_BY_LABEL: MANAGED_BY}


def test_network_profiles_default_to_the_generated_node_stage_secret_in_their_storage_class() -> None:
    for protocol in ("nvmeof-tcp", "iscsi"):
        sc = storage_class("gold", {"storageType": "block", "accessProtocol": protocol}, "opensds-system")
        assert sc["parameters"][NODE_STAGE_SECRET_NAME] == SECRET_NAME
        assert sc["parameters"][NODE_STAGE_SECRET_NAMESPACE] == "opensds-system"
    opted_out = storage_class("gold", {"storageType": "block", "accessProtocol": "iscsi",
                                       "unauthenticatedExports": True})
    local = storage_class("gold", {"storageType": "block", "accessProtocol": "local"})
    assert NODE_STAGE_SECRET_NAME not in opted_out["parameters"] and NODE_STAGE_SECRET_NAME not in local["parameters"]
    own = {"name": "mine", "namespace": "ops"}
    assert node_stage_secret_ref({"accessProtocol": "iscsi", "nodeStageSecretRef": own}) == own


# ---------------------------------------------------------------- item 11: whose object is it


def test_only_objects_carrying_the_operators_label_count_as_its_own() -> None:
    assert is_managed(storage_class("gold", {"storageType": "block", "accessProtocol": "local"}))
    assert is_managed(snapshot_class("gold"))
    assert not is_managed({"metadata": {"name": "gold"}})
    assert not is_managed({"metadata": {"name": "gold", "labels": {MANAGED_BY_LABEL: "helm"}}})
