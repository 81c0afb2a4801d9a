"""A watch-fed cache of the Volume and Snapshot CRs in the controller's namespace.

The controller turns each CSI call into a CR write and then waits for the operator and
dock to report the outcome in status. Waiting on one shared watch per resource (instead of
polling each object) keeps 200 concurrent CreateVolume calls at two API connections.

Every request has a timeout: a list gives up after LIST_TIMEOUT, and a watch asks the server
to end it after `watch_timeout` seconds and gives up reading after `watch_timeout` + a grace
period of silence, so a wedged connection (an apiserver restarted behind a NAT, a dropped
TCP session) reconnects instead of leaving every waiting CSI call to time out.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError, ProtocolError, ReadTimeoutError

from opensds_operator import kube
from opensds_operator.api import GROUP, SNAPSHOTS, VERSION, VOLUMES

from .errors import DeadlineExceeded

log = logging.getLogger(__name__)
Obj = dict[str, Any]
Predicate = Callable[[Obj | None], bool]
LIST_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds
WATCH_GRACE = 15.0  # silence beyond the server-side watch timeout that means the connection is wedged


def _rv(obj: Obj) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion", 0))
    except ValueError:
        return 0


class ObjectStore:
    PLURALS = (VOLUMES, SNAPSHOTS)

    def __init__(self, namespace: str, api: client.CustomObjectsApi | None = None,
                 watch_timeout: float = 120.0, watch_grace: float = WATCH_GRACE) -> None:
        self.namespace = namespace
        self._api = api
        self.watch_timeout = watch_timeout
        self.watch_grace = watch_grace
        self._items: dict[str, dict[str, Obj]] = {plural: {} for plural in self.PLURALS}
        self._cond = threading.Condition()
        self._synced = {plural: threading.Event() for plural in self.PLURALS}
        self._stopping = threading.Event()

    # ------------------------------------------------------------ reading

    @property
    def synced(self) -> bool:
        return all(event.is_set() for event in self._synced.values())

    def get(self, plural: str, name: str) -> Obj | None:
        with self._cond:
            return self._items[plural].get(name)

    def items(self, plural: str) -> list[Obj]:
        """All cached objects, sorted by name (a stable order for paginated listing)."""
        with self._cond:
            return [self._items[plural][name] for name in sorted(self._items[plural])]

    def wait_for(self, plural: str, name: str, done: Predicate, timeout: float, what: str) -> Obj | None:
        """Block until `done(object or None)` holds; the predicate may raise a CsiError to give up early."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                obj = self._items[plural].get(name)
                if done(obj):
                    return obj
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"timed out after {timeout:.0f}s waiting for {what}; it continues "
                                           f"in the background and a retry picks it up")
                self._cond.wait(left)

    # ------------------------------------------------------------ writing

    def put(self, plural: str, obj: Obj) -> None:
        """Remember the result of our own write at once (the watch event follows later)."""
        name = obj["metadata"]["name"]
        with self._cond:
            known = self._items[plural].get(name)
            if known is None or _rv(obj) >= _rv(known):
                self._items[plural][name] = obj
            self._cond.notify_all()

    def _apply(self, plural: str, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        with self._cond:
            if kind == "DELETED":
                known = self._items[plural].get(name)
                if known is None or known["metadata"].get("uid") == obj["metadata"].get("uid"):
                    self._items[plural].pop(name, None)
            else:
                known = self._items[plural].get(name)
                if known is None or _rv(obj) >= _rv(known) or known["metadata"]["uid"] != obj["metadata"]["uid"]:
                    self._items[plural][name] = obj
            self._cond.notify_all()

    # ------------------------------------------------------------ watching

    def start(self) -> None:
        for plural in self.PLURALS:
            threading.Thread(target=self._run, args=(plural,), name=f"watch-{plural}", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(event.wait(max(deadline - time.monotonic(), 0)) for event in self._synced.values())

    @property
    def api(self) -> client.CustomObjectsApi:
        return self._api or kube.custom()

    def _relist(self, plural: str) -> str:
        result = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, plural,
                                                        _request_timeout=LIST_TIMEOUT)
        fresh = {item["metadata"]["name"]: item for item in result.get("items", [])}
        with self._cond:
            self._items[plural] = fresh
            self._cond.notify_all()
        self._synced[plural].set()
        rv: str = result["metadata"]["resourceVersion"]
        return rv

    def _run(self, plural: str) -> None:
        """List, then watch from that version; relist when the version expired (410) or on errors."""
        rv: str | None = None
        while not self._stopping.is_set():
            try:
                if rv is None:
                    rv = self._relist(plural)
                stream = watch.Watch().stream(
                    self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, plural,
                    resource_version=rv, timeout_seconds=max(int(self.watch_timeout), 1),
                    allow_watch_bookmarks=True,
                    _request_timeout=(LIST_TIMEOUT[0], self.watch_timeout + self.watch_grace))
                for event in stream:
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        if obj.get("code") == 410:
                            rv = None
                        break
                    rv = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._apply(plural, event["type"], obj)
            except (ReadTimeoutError, ProtocolError) as e:
                # Silent past the server's own timeout, or cut mid-stream: resume from the last version.
                log.warning("watch of %s stalled or broke (%s); reconnecting", plural, type(e).__name__)
            except HTTPError as e:  # refused/reset while the apiserver restarts: expected, no traceback
                log.warning("watch of %s: API unreachable (%s); relisting", plural, type(e).__name__)
                rv = None
                time.sleep(1)
            except ApiException as e:
                log.warning("watch of %s failed: %s; relisting", plural, e.reason)
                rv = None
                time.sleep(1)
            except Exception:
                log.exception("watch of %s failed; relisting", plural)
                rv = None
                time.sleep(1)
