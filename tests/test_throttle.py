"""The login throttle on its own: it stops guessing and spraying from an address, and nobody can
use it to lock a user out by name."""

from __future__ import annotations

import random
import time

from trackgate.server.throttle import LoginThrottle


def _fail(throttle: LoginThrottle, address: str, user: str, times: int = 1) -> None:
    for _ in range(times):
        throttle.record_failure(address, user)


def test_guessing_one_name_from_one_address_waits_after_the_limit() -> None:
    throttle = LoginThrottle(limit=3, window=60)
    _fail(throttle, "10.0.0.66", "carol", 2)
    assert throttle.check("10.0.0.66", "carol") is None
    _fail(throttle, "10.0.0.66", "carol")
    refusal = throttle.check("10.0.0.66", "carol")
    assert refusal is not None
    assert "'carol'" in refusal.reason
    assert 0 < refusal.retry_after <= 60


def test_the_attack_on_carol_does_not_refuse_carol_elsewhere() -> None:
    # Attack 4: ten wrong guesses a minute from one address used to lock carol out everywhere.
    throttle = LoginThrottle(limit=10, window=60)
    for _ in range(5):  # five windows' worth of guesses, as fast as the throttle lets them
        _fail(throttle, "10.0.0.66", "carol", 10)
    assert throttle.check("10.0.0.66", "carol") is not None
    assert throttle.check("192.0.2.1", "carol") is None


def test_spraying_names_from_one_address_stops_new_names_but_not_known_ones() -> None:
    throttle = LoginThrottle(limit=3, window=60)
    throttle.record_success("10.0.0.66", "dave")  # a colleague behind the same NAT
    for name in ("a", "b", "c"):
        _fail(throttle, "10.0.0.66", name)
    refusal = throttle.check("10.0.0.66", "erin")
    assert refusal is not None and "10.0.0.66" in refusal.reason and "'erin'" in refusal.reason
    assert throttle.check("10.0.0.66", "dave") is None
    assert throttle.check("10.0.0.67", "erin") is None


def test_a_known_name_still_cannot_be_guessed_past_its_own_limit() -> None:
    throttle = LoginThrottle(limit=3, window=60)
    throttle.record_success("10.0.0.66", "dave")
    _fail(throttle, "10.0.0.66", "dave", 3)
    assert throttle.check("10.0.0.66", "dave") is not None


def test_the_per_name_ceiling_refuses_only_addresses_that_failed() -> None:
    throttle = LoginThrottle(limit=3, window=60, user_factor=20)
    # A botnet: 60 addresses, one guess each, far below any per-address limit.
    for i in range(60):
        _fail(throttle, f"10.1.{i}.1", "carol")
    refusal = throttle.check("10.1.7.1", "carol")
    assert refusal is not None
    assert "'carol'" in refusal.reason and "without failures are not refused" in refusal.reason
    assert 0 < refusal.retry_after <= 60
    assert throttle.check("192.0.2.1", "carol") is None  # carol herself, from home
    assert throttle.check("10.1.7.1", "bob") is None  # only that name


def test_the_per_name_ceiling_is_far_above_what_one_address_can_reach() -> None:
    throttle = LoginThrottle(limit=3, window=60, user_factor=20)
    _fail(throttle, "10.0.0.66", "carol", 3)
    assert throttle.check("10.0.0.66", "carol") is not None  # the pair limit stops it here
    assert throttle.users.retry_after("carol") == 0  # nowhere near the ceiling


def test_a_correct_password_from_an_address_without_failures_is_never_refused() -> None:
    rng = random.Random(12)
    throttle = LoginThrottle(limit=3, window=60, user_factor=2)
    users = ["carol", "dave", "erin"]
    for _ in range(2000):
        address = f"10.2.{rng.randrange(40)}.1"
        user = rng.choice(users)
        if throttle.check(address, user) is None:
            throttle.record_failure(address, user)
    for user in users:
        assert throttle.check("192.0.2.99", user) is None


def test_success_clears_that_pairs_failures() -> None:
    throttle = LoginThrottle(limit=3, window=60)
    _fail(throttle, "10.0.0.5", "carol", 2)
    throttle.record_success("10.0.0.5", "carol")
    _fail(throttle, "10.0.0.5", "carol", 2)
    assert throttle.check("10.0.0.5", "carol") is None


def test_everything_is_forgotten_after_the_window() -> None:
    throttle = LoginThrottle(limit=1, window=0.2, user_factor=1)
    _fail(throttle, "10.0.0.5", "carol")
    assert throttle.check("10.0.0.5", "carol") is not None
    time.sleep(0.3)
    assert throttle.check("10.0.0.5", "carol") is None


def test_reasons_are_plain_ascii_whatever_the_name() -> None:
    throttle = LoginThrottle(limit=1, window=60)
    name = 'evil"\r\nSet-Cookie: x=1 \u0430dmin %41'
    _fail(throttle, "10.0.0.5", name)
    refusal = throttle.check("10.0.0.5", name)
    assert refusal is not None
    assert refusal.reason.isascii() and refusal.reason.isprintable()
    assert "\r" not in refusal.reason and '"' not in refusal.reason
    assert "%D0%B0dmin" in refusal.reason


def test_memory_is_bounded() -> None:
    throttle = LoginThrottle(limit=5, window=60, max_keys=100)
    for i in range(1000):
        throttle.record_failure(f"10.3.{i // 250}.{i % 250}", f"user{i}")
        throttle.record_success(f"10.4.{i // 250}.{i % 250}", f"user{i}")
    assert len(throttle.pairs._failures) <= 100
    assert len(throttle.users._failures) <= 100
    assert len(throttle._known_good) <= 100
