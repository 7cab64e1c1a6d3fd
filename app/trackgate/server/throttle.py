"""Failed-login throttling that slows attackers down without locking users out.

Only failures are counted, and a credential already verified (cached) is never throttled, so a
flood of wrong guesses cannot lock out users who are logged in. Three counters, each over a
sliding window:

- per (client address, username): ``limit`` failures, then that address waits for that name.
  This is what stops guessing one password.
- per client address: ``limit`` failures (any names), then new logins from that address wait,
  except for a name that logged in successfully from it before (a colleague behind the same
  NAT as the attacker keeps logging in). This is what stops spraying many names.
- per username, across addresses: only far above what one address can reach
  (``user_factor`` x ``limit``), and even then it refuses only addresses that have failed
  themselves. A correct password from an address without failures always reaches bcrypt, so
  nobody can lock a user out by name; a botnet gets one guess per fresh address.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from urllib.parse import quote

USER_FACTOR = 20
KNOWN_GOOD_TTL = 7 * 24 * 3600.0


class FailureThrottle:
    """Failure times per key over a sliding window; a key waits once it has `limit` of them."""

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
                times = self._current(key, now)
                if times is not None and len(times) >= self._limit:
                    wait = max(wait, times[0] + self._window - now)
        return _seconds(wait)

    def failing_for(self, key: str) -> int:
        """Seconds until KEY has no failure left in the window (0: none now)."""
        now = time.monotonic()
        with self._lock:
            times = self._current(key, now)
            return _seconds(times[-1] + self._window - now) if times else 0

    def record_failure(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) >= self._max_keys:
                self._prune(now)
            for key in keys:
                times = self._failures.setdefault(key, deque(maxlen=self._limit))
                times.append(now)

    def forget(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def _current(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self._window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def _prune(self, now: float) -> None:
        stale = [k for k, t in self._failures.items() if not t or t[-1] <= now - self._window]
        for key in stale:
            del self._failures[key]
        if len(self._failures) >= self._max_keys:  # still full under attack: forget the oldest
            for key in list(self._failures)[: self._max_keys // 10]:
                del self._failures[key]


@dataclass(frozen=True)
class Refusal:
    """Why a login attempt does not reach bcrypt, and for how long (seconds)."""

    reason: str
    retry_after: int


class LoginThrottle:
    """The three counters above, and the (address, name) pairs that logged in before."""

    def __init__(
        self,
        limit: int = 10,
        window: float = 60.0,
        *,
        user_factor: int = USER_FACTOR,
        known_good_ttl: float = KNOWN_GOOD_TTL,
        max_keys: int = 100_000,
    ) -> None:
        self.pairs = FailureThrottle(limit, window, max_keys)
        self.addresses = FailureThrottle(limit, window, max_keys)
        self.users = FailureThrottle(limit * user_factor, window, max_keys)
        self._known_good: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._known_good_ttl = known_good_ttl
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def check(self, address: str, username: str) -> Refusal | None:
        """None if this attempt may be checked with bcrypt, else why not."""
        name = _shown(username)
        wait = self.pairs.retry_after(_pair(address, username))
        if wait:
            return Refusal(f"too many failed logins for user '{name}' from your address", wait)
        wait = self.addresses.retry_after(address)
        if wait and not self._known(address, username):
            return Refusal(
                f"too many failed logins from your address {_shown(address)} (for user "
                f"'{name}' too: only users who logged in from it before may log in now)",
                wait,
            )
        wait = self.users.retry_after(username)
        failing = self.addresses.failing_for(address) if wait else 0
        if wait and failing:
            return Refusal(
                f"user '{name}' is the target of many failed logins and your address has "
                "failed logins too (addresses without failures are not refused)",
                min(wait, failing),
            )
        return None

    def record_failure(self, address: str, username: str) -> None:
        self.pairs.record_failure(_pair(address, username))
        self.addresses.record_failure(address)
        self.users.record_failure(username)

    def record_success(self, address: str, username: str) -> None:
        self.pairs.forget(_pair(address, username))
        now = time.monotonic()
        with self._lock:
            self._known_good[(address, username)] = now + self._known_good_ttl
            self._known_good.move_to_end((address, username))
            while len(self._known_good) > self._max_keys:
                self._known_good.popitem(last=False)

    def _known(self, address: str, username: str) -> bool:
        with self._lock:
            expires = self._known_good.get((address, username))
            if expires is None:
                return False
            if expires <= time.monotonic():
                del self._known_good[(address, username)]
                return False
            return True


def _pair(address: str, username: str) -> str:
    return f"{address}\0{username}"


# Printable ASCII but '%', '"' and '\': what a header and a plain-text body can carry as is.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '%"\\')


def _shown(text: str) -> str:
    """TEXT for a header (Latin-1) and a message: anything unusual percent-encoded."""
    return quote(text[:200], safe=_SAFE)


def _seconds(wait: float) -> int:
    return math.ceil(wait) if wait > 0 else 0
