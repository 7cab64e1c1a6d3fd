"""Verified credentials kept in memory, so bcrypt runs once per user and password, not per request.

Entries are keyed by an HMAC of username and password under a random per-process key (the
plaintext is never stored), bounded in number and age, and valid only while the user's hash in
the htpasswd file is the one that was checked: a changed or removed user misses at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict


class CredentialCache:
    def __init__(self, max_entries: int = 10_000, ttl: float = 900.0) -> None:
        self._key = secrets.token_bytes(32)
        self._max = max_entries
        self._ttl = ttl
        self._entries: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _digest(self, username: str, password: str) -> bytes:
        message = username.encode() + b"\0" + password.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def hit(self, username: str, password: str, current_hash: str) -> bool:
        """True if this exact credential was verified against the user's current hash."""
        if self._max == 0 or self._ttl <= 0:
            return False
        key = self._digest(username, password)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            checked_hash, expires = entry
            if time.monotonic() >= expires or not hmac.compare_digest(checked_hash, current_hash):
                del self._entries[key]
                return False
            self._entries.move_to_end(key)
            return True

    def add(self, username: str, password: str, checked_hash: str) -> None:
        """Remember a credential that just passed bcrypt against `checked_hash`."""
        if self._max == 0 or self._ttl <= 0:
            return
        key = self._digest(username, password)
        with self._lock:
            self._entries[key] = (checked_hash, time.monotonic() + self._ttl)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
