"""The credential cache and failure throttle on their own: bounds, expiry, keyed storage."""

from __future__ import annotations

import time

from trackgate.server.credentials import CredentialCache
from trackgate.server.throttle import FailureThrottle


def test_cache_hits_only_for_the_same_password_and_the_same_hash() -> None:
    cache = CredentialCache()
    cache.add("alice", "pw", "$2y$12$hashA")
    assert cache.hit("alice", "pw", "$2y$12$hashA")
    assert not cache.hit("alice", "pw2", "$2y$12$hashA")
    assert not cache.hit("alice", "pw", "$2y$12$hashB")  # the password was changed
    assert not cache.hit("alice", "pw", "$2y$12$hashA")  # ...and the stale entry is gone


def test_cache_never_stores_the_plaintext() -> None:
    cache = CredentialCache()
    cache.add("alice", "correct horse", "$2y$12$hash")
    stored = repr(cache._entries)
    assert "correct horse" not in stored and "alice" not in stored


def test_cache_is_bounded_in_size_evicting_the_least_recent() -> None:
    cache = CredentialCache(max_entries=3)
    for i in range(4):
        cache.add(f"u{i}", "pw", "h")
    assert len(cache) == 3
    assert not cache.hit("u0", "pw", "h")
    assert cache.hit("u3", "pw", "h")


def test_cache_entries_expire() -> None:
    cache = CredentialCache(ttl=0.2)
    cache.add("alice", "pw", "h")
    time.sleep(0.3)
    assert not cache.hit("alice", "pw", "h")


def test_cache_can_be_switched_off() -> None:
    cache = CredentialCache(max_entries=0)
    cache.add("alice", "pw", "h")
    assert not cache.hit("alice", "pw", "h")


def test_throttle_waits_only_after_the_limit_and_only_for_those_keys() -> None:
    throttle = FailureThrottle(limit=3, window=60)
    for _ in range(2):
        throttle.record_failure("ip:a", "user:x")
    assert throttle.retry_after("ip:a") == 0
    throttle.record_failure("ip:a", "user:x")
    assert 0 < throttle.retry_after("ip:a") <= 60
    assert throttle.retry_after("ip:b", "user:y") == 0
    assert throttle.retry_after("ip:b", "user:x") > 0


def test_throttle_forgets_failures_after_the_window() -> None:
    throttle = FailureThrottle(limit=1, window=0.2)
    throttle.record_failure("ip:a")
    assert throttle.retry_after("ip:a") > 0
    time.sleep(0.3)
    assert throttle.retry_after("ip:a") == 0


def test_throttle_memory_is_bounded_under_a_spray_of_keys() -> None:
    throttle = FailureThrottle(limit=5, window=60, max_keys=100)
    for i in range(1000):
        throttle.record_failure(f"user:{i}")
    assert len(throttle._failures) <= 100
