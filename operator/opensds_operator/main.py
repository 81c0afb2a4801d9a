"""Entry points: `opensds-operator` (scheduler, profile sync) and `opensds-dock --backend NAME`."""
from __future__ import annotations

import argparse
import base64
import logging
import time
from typing import Any

import kopf

from . import kube
from .api import BACKENDS, DOCK_FINALIZER, OPERATOR_FINALIZER
from .conditions import set_condition
from .drivers.base import PermanentDriverError

PERSISTENCE_PREFIX = {"operator": "operator.opensds.io", "dock": "dock.opensds.io"}
FINALIZER = {"operator": OPERATOR_FINALIZER, "dock": DOCK_FINALIZER}


def settings_for(role: str) -> kopf.OperatorSettings:
    """Operator and docks handle the same objects: each keeps its own kopf state and finalizer."""
    settings = kopf.OperatorSettings()
    prefix = PERSISTENCE_PREFIX[role]
    settings.persistence.finalizer = FINALIZER[role]
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # handler chatter stays in logs; Events are ours
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 32
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
             clusterwide=True, liveness_endpoint=args.liveness)


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


def run_dock() -> None:
    parser = argparse.ArgumentParser(prog="opensds-dock", description="Serve one StorageBackend")
    _common_args(parser)
    parser.add_argument("--backend", required=True, help="name of the StorageBackend this dock serves")
    parser.add_argument("--capacity-interval", type=float, default=30.0,
                        help="seconds between pool capacity reports")
    parser.add_argument("--orphan-interval", type=float, default=300.0,
                        help="seconds between sweeps for backend objects no CR owns")
    args = parser.parse_args()
    _logging(args.verbose)
    from .drivers import make_driver
    from .exports import make_exporters
    from .handlers.dock import Dock, build_registry

    log = logging.getLogger("opensds.dock")
    while (backend := kube.get(BACKENDS, args.backend)) is None:
        log.info("waiting for StorageBackend %s to exist", args.backend)
        time.sleep(5)
    try:
        driver = make_driver(backend["spec"], secret_key=_backend_secret(backend["spec"]))
        exporters = make_exporters(backend["spec"])
    except PermanentDriverError as e:
        conditions = set_condition((backend.get("status") or {}).get("conditions"), "Ready", False,
                                   "InvalidParameters", str(e))
        kube.patch_status(BACKENDS, args.backend, {"conditions": conditions})
        kube.post_event(backend, "InvalidParameters", str(e), warning=True, component="opensds-dock")
        raise SystemExit(f"opensds-dock: {e}") from e
    dock = Dock(args.backend, driver, exporters)
    # The backend may set its own report interval; the scheduler's staleness check uses it too.
    interval = float(backend["spec"].get("capacityReportIntervalSeconds", args.capacity_interval))
    registry = build_registry(dock, interval, args.orphan_interval)
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.run(registry=registry, settings=settings_for("dock"), standalone=True, clusterwide=True,
             liveness_endpoint=args.liveness)
