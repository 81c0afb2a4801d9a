"""CSI Node service: attach through a connector, format if blank, mount; bind into pods; grow; report.

Every call is idempotent against the state recorded in `nodestate`, because kubelet repeats
calls after timeouts and plugin restarts. The node needs no Kubernetes API access: all it
must know arrives in publish_context (written by the dock, passed on by the attacher) and
volume_context (written by the controller at CreateVolume, kept in the PV).

Neither is trusted blindly: the transport must be the volume's profile's accessProtocol and
the object publish_context names must carry the volume's UID (connectors check the rest, see
connectors/base.py). A device is formatted only when it is provably blank (mounts.py).
NodeGetVolumeStats never blocks a gRPC worker on a dead mount, and an unreadable state
record never blocks NodeUnstage.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from opensds_operator.api import CTX_TRANSPORT, VC_ACCESS_PROTOCOL, VC_VOLUME_UID
from opensds_operator.qos import IoLimits

from . import iolimits, mounts
from .connectors import DEFAULT_LOCAL_ROOTS, Connector, Connectors
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from .locks import KeyLocks
from .nodestate import CorruptState, NodeState, StagedVolume
from .proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)
DEFAULT_FS = "ext4"
READ_ONLY_MODES = frozenset({
    csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY,
    csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY,
})


def _access_type(capability: csi_pb2.VolumeCapability) -> str:
    if capability.HasField("block"):
        return "block"
    if capability.HasField("mount"):
        return "mount"
    raise InvalidArgument("volume_capability needs access_type block or mount")


def _require(**fields: str) -> None:
    for name, value in fields.items():
        if not value:
            raise InvalidArgument(f"{name} is required")


def _present(path: str) -> bool:
    """Whether path exists; errors other than "no such file" are raised (a broken mount is not absent)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


def checked_connector(connectors: Connectors, volume_id: str, publish_context: Mapping[str, str],
                      volume_context: Mapping[str, str]) -> tuple[str, Connector]:
    """The transport and connector for a volume, once publish_context is consistent with it.

    The transport must be the profile's accessProtocol and the volume UID the context names
    (a vol-<uid> path or image, a namespace UUID, a unit serial) the one the controller
    recorded, when volume_context carries them (PVs made before they were recorded do not).
    """
    transport = publish_context.get(CTX_TRANSPORT)
    if not transport:
        raise InvalidArgument(f"publish_context of {volume_id} names no {CTX_TRANSPORT!r}")
    connector = connectors.get(transport)
    protocol = volume_context.get(VC_ACCESS_PROTOCOL)
    if protocol and protocol != transport:
        raise FailedPrecondition(f"publish_context of {volume_id} asks for transport {transport}, but the volume's "
                                 f"profile uses accessProtocol {protocol}; refusing it")
    uid = connector.volume_uid(volume_id, publish_context)
    expected = volume_context.get(VC_VOLUME_UID)
    if expected and uid != expected:
        raise FailedPrecondition(f"publish_context of {volume_id} names volume {uid}, but the volume is {expected}; "
                                 f"refusing it")
    if not expected or not protocol:
        log.info("volume %s: volume_context has no %s/%s (made before they were recorded); checked the "
                 "publish_context on its own", volume_id, VC_VOLUME_UID, VC_ACCESS_PROTOCOL)
    return transport, connector


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, topology: Mapping[str, str], state_dir: str, max_volumes: int = 0,
                 cgroup_root: Path = iolimits.CGROUP_ROOT, local_roots: Sequence[str] = DEFAULT_LOCAL_ROOTS) -> None:
        self.node_id = node_id
        self.cgroup_root = cgroup_root
        self.topology = dict(topology)
        self.max_volumes = max_volumes
        self.state = NodeState(state_dir)
        self.locks = KeyLocks()
        self.connectors = Connectors(node_id, local_roots)

    def _record(self, volume_id: str) -> StagedVolume | None:
        """The node's record of a volume; an unreadable one is FailedPrecondition (never a crash)."""
        try:
            return self.state.get(volume_id)
        except CorruptState as e:
            raise FailedPrecondition(f"{e}; NodeUnstageVolume sets it aside") from e

    # ------------------------------------------------------------ stage

    def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest,
                        context: grpc.ServicerContext) -> csi_pb2.NodeStageVolumeResponse:
        _require(volume_id=request.volume_id, staging_target_path=request.staging_target_path)
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        access = _access_type(request.volume_capability)
        fs_type = (request.volume_capability.mount.fs_type or DEFAULT_FS) if access == "mount" else ""
        if fs_type and fs_type not in mounts.SUPPORTED_FILESYSTEMS:
            raise InvalidArgument(f"fs_type {fs_type!r} is not supported ({', '.join(mounts.SUPPORTED_FILESYSTEMS)})")
        flags = list(request.volume_capability.mount.mount_flags) if access == "mount" else []
        staging = os.path.realpath(request.staging_target_path)
        with self.locks.hold(request.volume_id):
            transport, connector = checked_connector(self.connectors, request.volume_id, request.publish_context,
                                                     request.volume_context)
            try:
                known = self.state.get(request.volume_id)
            except CorruptState as e:  # attach is idempotent: the same device is found again
                log.error("%s; set aside as %s, staging afresh", e, self.state.set_aside(request.volume_id))
                known = None
            if known is not None and known.staging_path != staging:
                raise AlreadyExists(f"volume {request.volume_id} is already staged at {known.staging_path}")
            if known is not None and known.access_type != access:
                raise AlreadyExists(f"volume {request.volume_id} is already staged for {known.access_type} access")
            device = connector.attach(request.volume_id, request.publish_context, request.secrets)
            volume = StagedVolume(
                volume_id=request.volume_id, transport=transport, context=dict(request.publish_context),
                device=device, staging_path=staging, access_type=access, fs_type=fs_type, mount_flags=flags,
                targets=known.targets if known else {})
            self.state.save(volume)  # before mounting: an unstage after a crash here still detaches
            if access == "mount":
                try:
                    self._mount_staged(volume)
                except FailedPrecondition:
                    if known is None:  # refused (e.g. not blank): leave nothing attached behind
                        connector.detach(volume.volume_id, volume.context, volume.device)
                        self.state.remove(volume.volume_id)
                    raise
        return csi_pb2.NodeStageVolumeResponse()

    @staticmethod
    def _mount_staged(volume: StagedVolume) -> None:
        current = mounts.mount_at(volume.staging_path)
        if current is not None:
            if os.path.realpath(current.source) == os.path.realpath(volume.device):
                return
            raise AlreadyExists(f"{volume.staging_path} already has {current.source} mounted")
        existing = mounts.detect_filesystem(volume.device)
        if existing is None:
            log.info("formatting %s (%s) as %s", volume.device, volume.volume_id, volume.fs_type)
            mounts.make_filesystem(volume.device, volume.fs_type)
            existing = volume.fs_type
        elif existing != volume.fs_type:
            # Never reformat data: mount what is there and say so.
            log.warning("%s holds %s, not the requested %s: mounting it as %s", volume.volume_id, existing,
                        volume.fs_type, existing)
        Path(volume.staging_path).mkdir(parents=True, exist_ok=True)
        mounts.mount(volume.device, volume.staging_path, existing, volume.mount_flags)

    def NodeUnstageVolume(self, request: csi_pb2.NodeUnstageVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodeUnstageVolumeResponse:
        _require(volume_id=request.volume_id, staging_target_path=request.staging_target_path)
        with self.locks.hold(request.volume_id):
            current = mounts.mount_at(request.staging_target_path)
            mounts.unmount(request.staging_target_path)
            try:
                volume = self.state.get(request.volume_id)
            except CorruptState as e:
                log.error("%s; unstaging from what the mount table and the devices say", e)
                self._release_unrecorded(request.volume_id, current.source if current else None)
                log.error("record of %s kept for inspection as %s", request.volume_id,
                          self.state.set_aside(request.volume_id))
                return csi_pb2.NodeUnstageVolumeResponse()
            if volume is not None:
                self.connectors.get(volume.transport).detach(volume.volume_id, volume.context, volume.device)
                self.state.remove(request.volume_id)
        return csi_pb2.NodeUnstageVolumeResponse()

    def _release_unrecorded(self, volume_id: str, device: str | None) -> None:
        """Detach the device that was mounted at the staging path, identified from sysfs."""
        context = self.connectors.identify(device) if device else None
        if context is None:
            log.error("volume %s: cannot tell which device to detach (staging path held %s); it stays attached "
                      "until an operator detaches it", volume_id, device or "nothing")
            return
        self.connectors.get(context[CTX_TRANSPORT]).detach(volume_id, context, device)
        log.warning("volume %s: detached %s (%s) from what sysfs says", volume_id, device, context[CTX_TRANSPORT])

    # ------------------------------------------------------------ publish

    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodePublishVolumeResponse:
        _require(volume_id=request.volume_id, target_path=request.target_path)
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        _require(staging_target_path=request.staging_target_path)
        access = _access_type(request.volume_capability)
        read_only = request.readonly or request.volume_capability.access_mode.mode in READ_ONLY_MODES
        target = request.target_path
        with self.locks.hold(request.volume_id):
            volume = self._record(request.volume_id)
            if volume is None or volume.staging_path != os.path.realpath(request.staging_target_path):
                raise FailedPrecondition(f"volume {request.volume_id} is not staged at "
                                         f"{request.staging_target_path}; NodeStageVolume first")
            if volume.access_type != access:
                raise InvalidArgument(f"volume {request.volume_id} was staged for {volume.access_type} access")
            single_writer = (request.volume_capability.access_mode.mode
                             == csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_SINGLE_WRITER)
            others = set(volume.targets) - {os.path.realpath(target)}
            if single_writer and others:
                raise FailedPrecondition(f"volume {request.volume_id} is SINGLE_NODE_SINGLE_WRITER and already "
                                         f"published at {', '.join(sorted(others))}")
            current = mounts.mount_at(target)
            if current is not None:
                if volume.targets.get(os.path.realpath(target)) not in (None, read_only):
                    raise AlreadyExists(f"{target} is already published with another read-only setting")
                return csi_pb2.NodePublishVolumeResponse()
            limits = IoLimits.from_context(request.publish_context or volume.context)
            cgroup = self._throttle(request.volume_id, volume.device, limits,
                                    request.volume_context.get(iolimits.POD_UID_KEY, ""))
            if access == "block":
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                Path(target).touch(exist_ok=True)
                mounts.bind_mount(volume.device, target, read_only)
            else:
                Path(target).mkdir(parents=True, exist_ok=True)
                mounts.bind_mount(volume.staging_path, target, read_only)
            volume.targets[os.path.realpath(target)] = read_only
            if cgroup:
                volume.throttled[os.path.realpath(target)] = cgroup
            self.state.save(volume)
        return csi_pb2.NodePublishVolumeResponse()

    def _throttle(self, volume_id: str, device: str, limits: IoLimits, pod_uid: str) -> str | None:
        """Apply the volume's I/O limits to the pod's cgroup; returns that cgroup (None: no limits)."""
        if not limits:
            return None
        if not pod_uid:
            log.warning("volume %s has I/O limits (%s) but no pod UID was passed (CSIDriver podInfoOnMount "
                        "is off?): not enforced", volume_id, limits)
            return None
        cgroup = iolimits.pod_cgroup(pod_uid, self.cgroup_root)
        if cgroup is None:
            raise FailedPrecondition(f"volume {volume_id} has I/O limits but pod {pod_uid} has no cgroup under "
                                     f"{self.cgroup_root} yet")
        iolimits.apply(cgroup, device, limits, self.cgroup_root)
        return str(cgroup)

    def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest,
                            context: grpc.ServicerContext) -> csi_pb2.NodeUnpublishVolumeResponse:
        _require(volume_id=request.volume_id, target_path=request.target_path)
        with self.locks.hold(request.volume_id):
            target = request.target_path
            mounts.unmount(target)
            path = Path(target)
            if path.is_dir():
                path.rmdir()
            elif path.exists():
                path.unlink()
            try:
                volume = self.state.get(request.volume_id)
            except CorruptState as e:  # the target is unmounted and gone: that is all this call owes
                log.error("%s; NodeUnstageVolume sets it aside", e)
                volume = None
            if volume is not None:
                cgroup = volume.throttled.pop(os.path.realpath(target), None)
                if cgroup:
                    iolimits.lift(Path(cgroup), volume.device)
                if volume.targets.pop(os.path.realpath(target), None) is not None or cgroup:
                    self.state.save(volume)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # ------------------------------------------------------------ stats and growth

    def _recorded_at(self, volume_id: str, path: str) -> StagedVolume:
        volume = self._record(volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id} is not staged on node {self.node_id}")
        if os.path.normpath(path) not in volume.paths() and os.path.realpath(path) not in volume.paths():
            raise NotFound(f"volume {volume_id} is not at {path}")
        return volume

    def _staged_at(self, volume_id: str, path: str) -> StagedVolume:
        volume = self._recorded_at(volume_id, path)
        try:
            present = mounts.bounded(f"exists:{path}", lambda: _present(path))
        except OSError as e:
            raise FailedPrecondition(f"{path} of volume {volume_id} is broken: {e.strerror} (errno {e.errno})") from e
        if present is None:
            raise Unavailable(f"{path} of volume {volume_id} does not answer (a dead mount?)")
        if not present:
            raise NotFound(f"volume {volume_id} is not at {path}")
        return volume

    def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext) -> csi_pb2.NodeGetVolumeStatsResponse:
        """Usage and condition; every look at the path or device is bounded (a dead mount answers abnormal)."""
        _require(volume_id=request.volume_id, volume_path=request.volume_path)
        path = request.volume_path
        volume = self._recorded_at(request.volume_id, path)
        broken: str | None
        try:
            exists = mounts.bounded(f"exists:{path}", lambda: _present(path))
        except OSError as e:  # EIO, ESTALE, ENOTCONN: there, but broken
            exists, broken = True, f"{path}: {e.strerror} (errno {e.errno})"
        else:
            broken = None if exists else f"{path} does not answer (a dead mount?)"
        if exists is False:
            raise NotFound(f"volume {request.volume_id} is not at {path}")
        problem = broken or self._problem(volume, path)
        usage: list[csi_pb2.VolumeUsage] = []
        if problem is None and volume.access_type == "block":
            size = mounts.bounded(f"size:{volume.device}", lambda: mounts.block_device_size(volume.device))
            if size is None:
                problem = f"device {volume.device} does not answer"
            else:
                usage.append(csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES, total=size))
        elif problem is None:
            st = mounts.statvfs(path)
            if st is None:
                problem = f"the filesystem at {path} does not answer within {mounts.STATS_TIMEOUT:g} s (a dead mount?)"
            else:
                usage += [
                    csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES, total=st.f_blocks * st.f_frsize,
                                        available=st.f_bavail * st.f_frsize,
                                        used=(st.f_blocks - st.f_bfree) * st.f_frsize),
                    csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.INODES, total=st.f_files, available=st.f_favail,
                                        used=st.f_files - st.f_ffree),
                ]
        condition = csi_pb2.VolumeCondition(abnormal=problem is not None, message=problem or "healthy")
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    @staticmethod
    def _problem(volume: StagedVolume, path: str) -> str | None:
        if not mounts.is_block_device(volume.device):
            return f"device {volume.device} is gone"
        if volume.transport == "local" and volume.device.startswith("/dev/loop"):
            backing = Path(f"/sys/block/{Path(volume.device).name}/loop/backing_file")
            if not backing.exists():
                return f"loop device {volume.device} was detached"
        if (volume.access_type == "mount" or path != volume.staging_path) and mounts.mount_at(path) is None:
            return f"{path} is no longer mounted"
        return None

    def NodeExpandVolume(self, request: csi_pb2.NodeExpandVolumeRequest,
                         context: grpc.ServicerContext) -> csi_pb2.NodeExpandVolumeResponse:
        _require(volume_id=request.volume_id, volume_path=request.volume_path)
        with self.locks.hold(request.volume_id):
            volume = self._staged_at(request.volume_id, request.volume_path)
            self.connectors.get(volume.transport).refresh(volume.device)
            if volume.access_type == "mount":
                mount = mounts.mount_at(volume.staging_path)
                mounts.grow_filesystem(volume.device, volume.staging_path, mount.fstype if mount else volume.fs_type)
            size = mounts.block_device_size(volume.device)
        required = request.capacity_range.required_bytes if request.HasField("capacity_range") else 0
        if required and size < required:
            raise FailedPrecondition(f"device {volume.device} is {size} bytes, less than the {required} asked; "
                                     f"has the controller expanded the volume?")
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    # ------------------------------------------------------------ info

    def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest,
                            context: grpc.ServicerContext) -> csi_pb2.NodeGetCapabilitiesResponse:
        rpc = csi_pb2.NodeServiceCapability.RPC
        kinds = (rpc.STAGE_UNSTAGE_VOLUME, rpc.GET_VOLUME_STATS, rpc.EXPAND_VOLUME, rpc.VOLUME_CONDITION,
                 rpc.SINGLE_NODE_MULTI_WRITER)
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=rpc(type=kind)) for kind in kinds])

    def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest,
                    context: grpc.ServicerContext) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.node_id, max_volumes_per_node=self.max_volumes,
            accessible_topology=csi_pb2.Topology(segments=self.topology))
