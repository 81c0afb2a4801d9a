"""iSCSI exports through LIO with rtslib-fb: one target per volume.

Target per volume (not per node with LUN masking): an ACL change touches only that volume's
target, unexport is one delete, and the IQN names the volume. Its TPG has
`generate_node_acls=0`, so only explicit NodeACLs log in: exactly one per published node
(initiator IQN derived from the node id), each mapping LUN 0. The block backstore's unit
serial is the volume UUID, which is how the node finds the disk (never by device order).
With CHAP credentials in the profile's Secret the TPG requires authentication and every
NodeACL carries them (and the mutual pair, when given, for the target to prove itself); the
ACL's auth attributes are made 0600 before a password is written (configfs makes them
world-readable).

Unpublish cuts live sessions: deleting a NodeACL makes LIO close that initiator's sessions
(checked in the VM: the session fails at once, its re-logins are refused as "not authorized",
queued writes never reach the LUN and fail once the initiator's replacement_timeout passes);
other initiators' sessions are untouched.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..api import CTX_AUTH, CTX_IQN, CTX_PORTALS, CTX_SERIAL, CTX_TRANSPORT
from ..drivers.base import DriverError, PermanentDriverError
from .base import IQN_PREFIX, ExportAuth, node_iqn, volume_iqn

log = logging.getLogger(__name__)
TARGET_CONFIGFS = Path("/sys/kernel/config/target")
# LIO keeps persistent-reservation and ALUA state in its "dbroot"; ours lives beside the
# dock's other state instead of /etc/target (absent on hosts without targetcli).
DBROOT = Path("/var/lib/opensds/target")
SECRET_MODE = 0o600
AUTH_ATTRIBUTES = ("userid", "password", "userid_mutual", "password_mutual")


def _restrict_auth(acl: Any) -> None:
    """NodeACL auth attributes readable by root only (before credentials go into them)."""
    auth = Path(acl.path) / "auth"
    for attribute in AUTH_ATTRIBUTES:
        if (auth / attribute).exists():
            os.chmod(auth / attribute, SECRET_MODE)


class LioExporter:
    protocol = "iscsi"

    def __init__(self, addresses: Sequence[tuple[str, int]], dbroot: Path = DBROOT) -> None:
        if not addresses:
            raise PermanentDriverError("iscsi needs at least one portal address (parameters.iscsiPortals)")
        self.addresses = list(addresses)
        self.dbroot = dbroot

    def _rts(self) -> Any:
        if not TARGET_CONFIGFS.is_dir():
            raise DriverError(f"{TARGET_CONFIGFS} is missing: load target_core_mod and iscsi_target_mod")
        import rtslib_fb

        self.dbroot.mkdir(parents=True, exist_ok=True)
        # rtslib's every internal RTSRoot() insists on /etc/target unless told otherwise, and the
        # class attribute is the only knob it has.
        rtslib_fb.RTSRoot._preferred_dbroot = str(self.dbroot)
        return rtslib_fb

    def _storage_object(self, rts: Any, name: str) -> Any:
        for so in rts.RTSRoot().storage_objects:
            if so.name == name and so.plugin == "block":
                return so
        return None

    def _target(self, rts: Any, iqn: str) -> Any:
        for target in rts.RTSRoot().targets:
            if target.wwn == iqn:
                return target
        return None

    def export(self, backend_id: str, device: str, uuid: str, nodes: Sequence[str],
               auth: ExportAuth | None = None) -> dict[str, str]:
        wanted = {node_iqn(n) for n in nodes}  # refuses names that are no node names, before any change
        rts = self._rts()
        chap = auth if auth and auth.chap_user and auth.chap_password else None
        so = self._storage_object(rts, backend_id)
        if so is None:
            so = rts.BlockStorageObject(backend_id, dev=device, wwn=uuid)
        target = self._target(rts, volume_iqn(backend_id)) or rts.Target(rts.FabricModule("iscsi"),
                                                                           volume_iqn(backend_id))
        tpg = next(iter(target.tpgs), None) or rts.TPG(target, 1)
        tpg.set_attribute("authentication", "1" if chap else "0")
        tpg.set_attribute("generate_node_acls", "0")
        tpg.set_attribute("demo_mode_write_protect", "1")
        have_portals = {(p.ip_address, p.port) for p in tpg.network_portals}
        for ip, port in self.addresses:
            if (ip, port) not in have_portals:
                rts.NetworkPortal(tpg, ip, port)
        lun = next((lun for lun in tpg.luns if lun.lun == 0), None) or rts.LUN(tpg, 0, so)
        for acl in list(tpg.node_acls):
            if acl.node_wwn not in wanted:
                acl.delete()
                log.info("%s: initiator %s no longer allowed; LIO closed its sessions", target.wwn, acl.node_wwn)
        have = {acl.node_wwn for acl in tpg.node_acls}
        for iqn in sorted(wanted - have):
            acl = rts.NodeACL(tpg, iqn)
            rts.MappedLUN(acl, 0, lun)
        for acl in tpg.node_acls:  # converge credentials too: a changed Secret rotates them
            _restrict_auth(acl)
            acl.chap_userid = chap.chap_user if chap else ""
            acl.chap_password = chap.chap_password if chap else ""
            acl.chap_mutual_userid = chap.chap_mutual_user if chap else ""
            acl.chap_mutual_password = chap.chap_mutual_password if chap else ""
        tpg.enable = True
        context = {
            CTX_TRANSPORT: self.protocol,
            CTX_IQN: target.wwn,
            CTX_PORTALS: ",".join(f"{ip}:{port}" for ip, port in self.addresses),
            CTX_SERIAL: uuid,
        }
        if chap:
            context[CTX_AUTH] = "chap-mutual" if chap.chap_mutual_user else "chap"
        return context

    def resize(self, backend_id: str) -> None:
        """LIO's block backstore reads the device size per command: nothing to tell it."""

    def unexport(self, backend_id: str) -> None:
        if not TARGET_CONFIGFS.is_dir():
            return
        rts = self._rts()
        target = self._target(rts, volume_iqn(backend_id))
        if target is not None:
            target.delete()
            log.info("removed iSCSI target %s", target.wwn)
        so = self._storage_object(rts, backend_id)
        if so is not None:
            so.delete()

    def exported(self) -> list[str]:
        if not TARGET_CONFIGFS.is_dir():
            return []
        prefix = f"{IQN_PREFIX}:"
        return sorted(t.wwn[len(prefix):] for t in self._rts().RTSRoot().targets if t.wwn.startswith(prefix))
