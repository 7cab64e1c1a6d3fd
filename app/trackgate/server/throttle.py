"""Failed-login counting per client IP and per username, for 429 + Retry-After answers.

Only failures are counted; a credential already verified (cached) is never throttled, so a
flood of wrong guesses cannot lock out users who are logged in.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque


class FailureThrottle:
    def __init__(self, limit: int = 10, window: float = 60.0, max_keys: int = 100_000) -> None:
        self._limit = limit
        self._window = window
        self._max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, *keys: str) -> int:
        """Seconds until every key may try again (0: not throttled)."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._failures.get(key)
                if times is None:
                    continue
                while times and times[0] <= now - self._window:
                    times.popleft()
                if not times:
                    del self._failures[key]
                elif len(times) >= self._limit:
                    wait = max(wait, times[0] + self._window - now)
        return math.ceil(wait) if wait > 0 else 0

    def record_failure(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) >= self._max_keys:
                self._prune(now)
            for key in keys:
                times = self._failures.setdefault(key, deque(maxlen=self._limit))
                times.append(now)

    def _prune(self, now: float) -> None:
        stale = [k for k, t in self._failures.items() if not t or t[-1] <= now - self._window]
        for key in stale:
            del self._failures[key]
        if len(self._failures) >= self._max_keys:  # still full under attack: forget the oldest
            for key in list(self._failures)[: self._max_keys // 10]:
                del self._failures[key]
