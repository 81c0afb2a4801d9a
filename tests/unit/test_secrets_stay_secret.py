"""Credentials never reach messages: masked in command errors, hidden from reprs."""
from __future__ import annotations

import pytest

from opensds_csi.run import CommandFailed, run
from opensds_operator.exports.base import ExportAuth


def test_a_failed_command_masks_the_secrets_it_was_given() -> None:
    with pytest.raises(CommandFailed) as failed:
        run("sh", "-c", 'echo "bad key $0" >&2; exit 3', "DHHC-1:00:c2VjcmV0:", secrets=["DHHC-1:00:c2VjcmV0:"])
    assert "DHHC-1:00:c2VjcmV0:" not in str(failed.value) and "***" in str(failed.value)
    assert "DHHC-1:00:c2VjcmV0:" not in failed.value.stderr


def test_export_auth_repr_hides_keys_and_passwords() -> None:
    auth = ExportAuth.from_secret({"dhchapHostKey": "DHHC-1:00:aaaa:", "chapUser": "node",
                                   "chapPassword": "pw-123456789"})
    assert "DHHC" not in repr(auth) and "pw-123456789" not in repr(auth) and "node" in repr(auth)
    assert auth.dhchap_host_key == "DHHC-1:00:aaaa:" and auth.chap_password == "pw-123456789"
