"""Non-blocking per-key locks: a second operation on the same volume gets ABORTED, not a queue.

CSI asks plugins to refuse concurrent operations on one volume rather than interleave them
(ceph-csi does the same); the CO retries with backoff.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import Aborted


class KeyLocks:
    def __init__(self) -> None:
        self._held: set[str] = set()
        self._mutex = threading.Lock()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._mutex:
            if key in self._held:
                raise Aborted(f"an operation on {key} is already in progress")
            self._held.add(key)
        try:
            yield
        finally:
            with self._mutex:
                self._held.discard(key)
