"""NVMe-oF/TCP exports through the kernel target's configfs tree (/sys/kernel/config/nvmet).

A subsystem per volume (NQN from the backend id) with namespace 1 on the backend device and
the volume's UUID as its NGUID/UUID, so the node finds the device by identity, never by
order. `allowed_hosts` holds exactly the host NQNs of the nodes the volume is published to;
`attr_allow_any_host` is always 0. Ports (one per configured address) are shared and linked
to each subsystem. Plain file writes and mkdir/symlink: no shelling out per attribute.

DH-HMAC-CHAP: nvmet keeps keys per host entry, and host entries are shared by every subsystem,
so a node's key is one for all exports of this target: an authenticated export writes the
Secret's keys into the published hosts' entries (a changed Secret rotates them; established
connections stay), and the host must then authenticate to every subsystem here. The key
attributes are made 0600 before a key is written (configfs creates them world-readable).

Unpublish cuts live connections: nvmet checks allowed_hosts only when a host connects, so a
host removed from it keeps its controllers (and keeps writing). Unlinking the subsystem from
its ports deletes every controller of the subsystem there; once allowed_hosts is converged the
ports are linked again. The removed host's reconnect is then refused (with DNR: the host
deletes the controller and fails its queued I/O), while the hosts still allowed reconnect on
their own after their reconnect_delay (10 s by default; I/O waits meanwhile, it does not fail,
within ctrl_loss_tmo, 600 s by default). Ports are unlinked before allowed_hosts changes and
re-linked after, so a dock that dies in between leaves the subsystem unreachable, never the
removed host connected; the next reconcile links the ports again.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..api import CTX_ADDRESSES, CTX_AUTH, CTX_NQN, CTX_TRANSPORT, CTX_UUID
from ..drivers.base import DriverError, PermanentDriverError
from .base import NQN_PREFIX, ExportAuth, node_host_nqn, volume_nqn

log = logging.getLogger(__name__)
CONFIGFS = Path("/sys/kernel/config/nvmet")
NSID = "1"
SECRET_MODE = 0o600  # configfs makes attributes 0644: keys must not be readable by every local user


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    if not path.exists() or _read(path) != value:
        path.write_text(value)


class NvmetExporter:
    protocol = "nvmeof-tcp"

    def __init__(self, addresses: Sequence[tuple[str, int]], root: Path = CONFIGFS) -> None:
        if not addresses:
            raise PermanentDriverError("nvmeof-tcp needs at least one target address (parameters.nvmeofAddresses)")
        self.addresses = list(addresses)
        self.root = root

    def _check(self) -> None:
        if not self.root.is_dir():
            raise DriverError(f"{self.root} is missing: load nvmet and nvmet-tcp and mount configfs")

    # ------------------------------------------------------------ ports

    def _port(self, address: tuple[str, int]) -> Path:
        """The port serving this address, made if missing (ids are small integers, reused)."""
        ports = self.root / "ports"
        for port in ports.iterdir():
            if (_read(port / "addr_trtype"), _read(port / "addr_traddr"), _read(port / "addr_trsvcid")) == (
                    "tcp", address[0], str(address[1])):
                return port
        used = {int(p.name) for p in ports.iterdir()}
        port = ports / str(next(i for i in range(1, 65535) if i not in used))
        port.mkdir()
        _write(port / "addr_trtype", "tcp")
        _write(port / "addr_adrfam", "ipv4")
        _write(port / "addr_traddr", address[0])
        _write(port / "addr_trsvcid", str(address[1]))
        log.info("nvmet port %s listening on %s:%d", port.name, *address)
        return port

    # ------------------------------------------------------------ export

    def export(self, backend_id: str, device: str, uuid: str, nodes: Sequence[str],
               auth: ExportAuth | None = None) -> dict[str, str]:
        self._check()
        wanted = {node_host_nqn(n) for n in nodes}  # refuses names that are no node names, before any change
        nqn = volume_nqn(backend_id)
        subsystem = self.root / "subsystems" / nqn
        subsystem.mkdir(exist_ok=True)
        _write(subsystem / "attr_allow_any_host", "0")
        namespace = subsystem / "namespaces" / NSID
        namespace.mkdir(exist_ok=True)
        if _read(namespace / "enable") != "1" or _read(namespace / "device_path") != device:
            _write(namespace / "enable", "0")
            _write(namespace / "device_path", device)
            _write(namespace / "device_uuid", uuid)
            _write(namespace / "device_nguid", uuid)
            _write(namespace / "enable", "1")
        allowed = subsystem / "allowed_hosts"
        revoked = [link for link in allowed.iterdir() if link.name not in wanted]
        if revoked:
            self._drop_controllers(nqn)
        for link in revoked:
            link.unlink()
            log.info("%s: host %s no longer allowed; its connections were cut", nqn, link.name)
        for host_nqn in sorted(wanted):
            host = self.root / "hosts" / host_nqn
            host.mkdir(exist_ok=True)
            if auth and auth.dhchap_host_key:
                self._set_keys(host, auth)
            if not (allowed / host_nqn).exists():
                os.symlink(host, allowed / host_nqn)
        for address in self.addresses:
            link = self._port(address) / "subsystems" / nqn
            if not link.exists():
                os.symlink(subsystem, link)
        self._forget_unused_hosts()
        context = {
            CTX_TRANSPORT: self.protocol,
            CTX_NQN: nqn,
            CTX_ADDRESSES: ",".join(f"{ip}:{port}" for ip, port in self.addresses),
            CTX_UUID: uuid,
        }
        if auth and auth.dhchap_host_key:
            context[CTX_AUTH] = "dhchap-bidirectional" if auth.dhchap_ctrl_key else "dhchap"
        return context

    def _drop_controllers(self, nqn: str) -> None:
        """Unlink the subsystem from every port: the kernel deletes its controllers there (the
        caller links the ports again once allowed_hosts no longer lists the revoked hosts)."""
        for port in (self.root / "ports").iterdir():
            (port / "subsystems" / nqn).unlink(missing_ok=True)

    @staticmethod
    def _set_keys(host: Path, auth: ExportAuth) -> None:
        if not (host / "dhchap_key").exists():
            raise PermanentDriverError("this kernel's nvmet has no DH-HMAC-CHAP (CONFIG_NVME_TARGET_AUTH); "
                                       "drop dhchapHostKey from the Secret or use a kernel with it")
        try:
            for attribute in ("dhchap_key", "dhchap_ctrl_key"):
                if (host / attribute).exists():
                    os.chmod(host / attribute, SECRET_MODE)  # before the key is in it
            _write(host / "dhchap_key", auth.dhchap_host_key)
            if auth.dhchap_ctrl_key:
                _write(host / "dhchap_ctrl_key", auth.dhchap_ctrl_key)
        except OSError as e:  # never echo the key itself
            raise PermanentDriverError(f"nvmet refused the DH-HMAC-CHAP key for {host.name} ({e.strerror}): "
                                       f"keys look like DHHC-1:00:<base64>: (nvme gen-dhchap-key)") from None

    def resize(self, backend_id: str) -> None:
        namespace = self.root / "subsystems" / volume_nqn(backend_id) / "namespaces" / NSID
        if namespace.exists():
            (namespace / "revalidate_size").write_text("1")

    def unexport(self, backend_id: str) -> None:
        if not self.root.is_dir():
            return
        nqn = volume_nqn(backend_id)
        for port in (self.root / "ports").iterdir():
            (port / "subsystems" / nqn).unlink(missing_ok=True)
        subsystem = self.root / "subsystems" / nqn
        if subsystem.exists():
            for link in (subsystem / "allowed_hosts").iterdir():
                link.unlink()
            namespace = subsystem / "namespaces" / NSID
            if namespace.exists():
                _write(namespace / "enable", "0")
                namespace.rmdir()
            subsystem.rmdir()
            log.info("removed nvmet subsystem %s", nqn)
        self._forget_unused_hosts()

    def exported(self) -> list[str]:
        if not self.root.is_dir():
            return []
        prefix = f"{NQN_PREFIX}:"
        return sorted(s.name[len(prefix):] for s in (self.root / "subsystems").iterdir() if s.name.startswith(prefix))

    def _forget_unused_hosts(self) -> None:
        """Host entries no subsystem allows any more (ours only) are removed."""
        in_use = {link.name for s in (self.root / "subsystems").iterdir() for link in (s / "allowed_hosts").iterdir()}
        for host in (self.root / "hosts").iterdir():
            if host.name.startswith(f"{NQN_PREFIX}:node:") and host.name not in in_use:
                host.rmdir()
