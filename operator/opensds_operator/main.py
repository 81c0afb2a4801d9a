"""Entry points: `opensds-operator` (scheduler, profile sync) and `opensds-dock --backend NAME`."""
from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import kopf
from kopf._core.engines.peering import Identity  # kopf.run()'s identity type, not re-exported

from . import kube
from .api import BACKENDS, CODE_INVALID_PARAMETERS, DOCK_FINALIZER, OPERATOR_FINALIZER, READY, dock_finalizer
from .conditions import set_condition
from .drivers import make_driver
from .drivers.base import Driver, PermanentDriverError
from .exports import make_exporters
from .exports.base import Exporter

PERSISTENCE_PREFIX = {"operator": "operator.opensds.io", "dock": "dock.opensds.io"}
FINALIZER = {"operator": OPERATOR_FINALIZER, "dock": DOCK_FINALIZER}


def _diffbase_key(backend: str | None) -> str:
    """kopf's last-handled annotation name, per backend for docks; an annotation name is at most
    63 characters, so long backend names are shortened with a hash of the whole name."""
    key = "last-handled-configuration"
    if not backend:
        return key
    if len(key) + 1 + len(backend) <= 63:
        return f"{key}.{backend}"
    return f"{key}.{backend[:24]}-{hashlib.sha256(backend.encode()).hexdigest()[:10]}"


def settings_for(role: str, backend: str | None = None) -> kopf.OperatorSettings:
    """Operator and docks handle the same objects: each keeps its own kopf state and finalizer.

    Every dock (one per backend) sees every object: its finalizer and last-handled state are
    its backend's own, or one dock strips another's finalizer and records as handled a change
    (a resize) that the other dock has yet to act on."""
    settings = kopf.OperatorSettings()
    prefix = PERSISTENCE_PREFIX[role]
    settings.persistence.finalizer = dock_finalizer(backend) if backend else FINALIZER[role]
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key=_diffbase_key(backend))
    settings.posting.level = logging.WARNING  # handler chatter stays in logs; Events are ours
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 32
    # A handler thread still inside a blocking call can hold the process after SIGTERM; every
    # handler is crash-safe, so kopf's own last resort (SIGKILL to itself) may come early.
    settings.process.ultimate_exiting_timeout = 20
    return settings


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8080/healthz")


def _logging(verbose: bool) -> None:
    """kopf's own log format: it prefixes each line about an object with [namespace/name]."""
    kopf.configure(verbose=verbose)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def run_operator() -> None:
    parser = argparse.ArgumentParser(prog="opensds-operator", description=__doc__)
    _common_args(parser)
    parser.add_argument("--over-subscription-ratio", type=float, default=1.0,
                        help="thin over-commit ratio for backends that do not set maxOverSubscriptionRatio")
    args = parser.parse_args()
    _logging(args.verbose)
    from .handlers import operator as handlers

    handlers.Settings.default_over_subscription_ratio = args.over_subscription_ratio
    kopf.on.login(registry=handlers.registry)(kopf.login_via_client)
    kopf.run(registry=handlers.registry, settings=settings_for("operator"), standalone=True,
             clusterwide=True, liveness_endpoint=args.liveness, identity=_identity())


def _identity() -> Identity:
    """This process's name in kopf's bookkeeping: host (the pod's name in a pod) and pid.

    kopf would otherwise ask the password database for the user name, which a container running
    as an arbitrary non-root UID (runAsUser) need not have.
    """
    return Identity(f"{socket.gethostname()}/{os.getpid()}")


def _backend_secret(spec: dict[str, Any]) -> str | None:
    """The credential in StorageBackend.spec.secretRef (key `key`); kept in memory only."""
    ref = spec.get("secretRef")
    if not ref:
        return None
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        secret = client.CoreV1Api(kube.api_client()).read_namespaced_secret(ref["name"], ref["namespace"])
    except ApiException as e:
        raise PermanentDriverError(f"cannot read Secret {ref['namespace']}/{ref['name']} "
                                   f"(spec.secretRef): {e.reason}") from e
    data = secret.data or {}
    if "key" not in data:
        raise PermanentDriverError(f"Secret {ref['namespace']}/{ref['name']} has no 'key' entry")
    return base64.b64decode(data["key"]).decode()


def _lock_path(spec: dict[str, Any], backend: str, lock_dir: str) -> Path:
    """The flock file: inside a file backend's own directory (it follows the data), else per node."""
    params = dict(spec.get("parameters") or {})
    if spec.get("driver") == "file" and params.get("path"):
        return Path(params["path"]) / ".dock.lock"
    return Path(lock_dir) / f"opensds-dock-{backend}.lock"


def _build(backend: dict[str, Any]) -> tuple[Driver, dict[str, Exporter]]:
    return make_driver(backend["spec"], secret_key=_backend_secret(backend["spec"])), make_exporters(backend["spec"])


def _wait_for_fixable_backend(name: str, log: logging.Logger) -> tuple[dict[str, Any], Driver, dict[str, Exporter]]:
    """Build the driver; on bad parameters report them and wait for an edit instead of crash-looping."""
    reported: int | None = None
    while True:
        backend = kube.get(BACKENDS, name)
        if backend is None:
            log.info("waiting for StorageBackend %s to exist", name)
            time.sleep(5)
            continue
        try:
            driver, exporters = _build(backend)
            return backend, driver, exporters
        except PermanentDriverError as e:
            generation = backend["metadata"].get("generation")
            if reported != generation:
                conditions = set_condition((backend.get("status") or {}).get("conditions"), READY, False,
                                           CODE_INVALID_PARAMETERS, str(e), generation)
                kube.patch_status(BACKENDS, name, {"conditions": conditions, "code": CODE_INVALID_PARAMETERS})
                kube.post_event(backend, CODE_INVALID_PARAMETERS, str(e), warning=True, component="opensds-dock")
                log.error("StorageBackend %s: %s; waiting for spec to change", name, e)
                reported = generation
            time.sleep(5)


def run_dock() -> None:
    parser = argparse.ArgumentParser(prog="opensds-dock", description="Serve one StorageBackend")
    _common_args(parser)
    parser.add_argument("--backend", required=True, help="name of the StorageBackend this dock serves")
    parser.add_argument("--capacity-interval", type=float, default=30.0,
                        help="seconds between pool capacity reports")
    parser.add_argument("--orphan-interval", type=float, default=300.0,
                        help="seconds between sweeps for backend objects no CR owns")
    parser.add_argument("--quarantine-hours", type=float, default=24.0,
                        help="how long an orphan stays quarantined (renamed aside) before it is purged")
    parser.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "opensds-system"),
                        help="namespace of the coordination.k8s.io Lease that makes this the backend's one writer")
    parser.add_argument("--lock-dir", default="/run/lock",
                        help="directory of the per-node flock file (file backends lock inside their path)")
    args = parser.parse_args()
    _logging(args.verbose)
    from .handlers.dock import Dock, build_registry
    from .leader import BackendLease, BackendLock, LockHeld

    log = logging.getLogger("opensds.dock")
    backend, driver, exporters = _wait_for_fixable_backend(args.backend, log)
    if hasattr(driver, "trash_delay_seconds"):  # RBD: Ceph itself refuses to purge trash before then
        driver.trash_delay_seconds = int(args.quarantine_hours * 3600)
    lock = BackendLock(_lock_path(backend["spec"], args.backend, args.lock_dir))
    while True:
        try:
            lock.acquire()
            break
        except LockHeld as e:
            log.info("another dock serves %s on this node (%s); waiting", args.backend, e)
            time.sleep(2)
    lease = BackendLease(kube.api_client(), args.backend, args.lease_namespace)
    lease.acquire()
    dock = Dock(args.backend, driver, exporters, quarantine_seconds=args.quarantine_hours * 3600)
    # The backend may set its own report interval; the scheduler's staleness check uses it too.
    interval = float(backend["spec"].get("capacityReportIntervalSeconds", args.capacity_interval))
    registry = build_registry(dock, interval, args.orphan_interval)
    kopf.on.login(registry=registry)(kopf.login_via_client)
    stop = threading.Event()

    def watch_lease() -> None:
        lease.lost.wait()
        log.error("lost the Lease of backend %s: stopping so that only one dock writes to it", args.backend)
        stop.set()

    threading.Thread(target=watch_lease, name="lease-watch", daemon=True).start()
    try:
        kopf.run(registry=registry, settings=settings_for("dock", args.backend), standalone=True, clusterwide=True,
                 liveness_endpoint=args.liveness, stop_flag=stop, identity=_identity())
    finally:
        lease.release()
        lock.release()
    if lease.lost.is_set():
        raise SystemExit(f"opensds-dock: lost the Lease of backend {args.backend}")
