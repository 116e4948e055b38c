"""Response bodies of finished jobs, kept in memory: what a finished job lists (its candidates)
never changes, and a dashboard asks for it again and again.

A body is cached under a key that names its content: a job's candidates are only ever added,
never changed or deleted, so (job id, number of candidates) is one list, and a cached body is
never stale, in this process or any other. Only jobs in a final status (succeeded, failed,
cancelled) are cached, so that a running search does not churn the cache. Bounded in bytes
(least recently used first out); one per process.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

FINAL = frozenset({"succeeded", "failed", "cancelled"})


class BodyCache:
    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, make: Callable[[], bytes]) -> bytes:
        """The body for ``key``, made by ``make()`` the first time (outside the lock: two
        first requests may both make it, and get the same bytes)."""
        with self._lock:
            body = self._bodies.get(key)
            if body is not None:
                self._bodies.move_to_end(key)
                return body
        body = make()
        if len(body) > self.max_bytes:
            return body
        with self._lock:
            if key not in self._bodies:
                self._bodies[key] = body
                self._bytes += len(body)
                while self._bytes > self.max_bytes:
                    _, old = self._bodies.popitem(last=False)
                    self._bytes -= len(old)
        return body

    def __len__(self) -> int:
        return len(self._bodies)
