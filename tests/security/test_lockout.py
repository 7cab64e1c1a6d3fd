"""Attack 4 of issue 12: anyone could lock a user out by name (ten wrong guesses a minute from
one address kept `carol` refused everywhere, right password or not), and every user behind the
attacker's address was refused too. Now failures count per (address, name) and per address; the
per-name ceiling is 20x higher and never refuses an address that has not been failing."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from ..support import RunningStack, fresh_source_ip, running_stack

pytestmark = pytest.mark.security

LIMIT = 3  # small, so the per-name ceiling (20 x LIMIT) is quick to reach


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(
        tmp_path_factory.mktemp("lockout-stack"), failure_limit=LIMIT, bcrypt_rounds=4
    ) as running:
        yield running


def _wrong(name: str) -> tuple[str, str]:
    return name, "wrong-" + secrets.token_hex(4)


def test_guessing_carols_password_does_not_lock_carol_out(stack: RunningStack) -> None:
    carol = stack.new_user("carol")
    attacker = fresh_source_ip()
    codes = [
        stack.get("/version", auth=_wrong(carol[0]), source_ip=attacker).status_code
        for _ in range(LIMIT)
    ]
    assert codes == [401] * LIMIT
    throttled = stack.get("/version", auth=_wrong(carol[0]), source_ip=attacker)
    assert throttled.status_code == 429
    seconds = int(throttled.headers["Retry-After"])
    assert 0 < seconds <= stack.settings.failure_window
    # The body says which name waits, from where, and for how long.
    assert f"'{carol[0]}'" in throttled.text and f"{seconds} s" in throttled.text
    # The attack fails: carol logs in from her own address with her right password.
    assert stack.get("/version", auth=carol, source_ip=fresh_source_ip()).status_code == 200


def test_users_behind_the_attackers_address_who_logged_in_before_keep_logging_in(
    stack: RunningStack,
) -> None:
    dave = stack.new_user("dave")
    erin = stack.new_user("erin")
    nat = fresh_source_ip()
    assert stack.get("/version", auth=dave, source_ip=nat).status_code == 200
    for i in range(LIMIT):  # the attacker sprays names from the shared address
        stack.get("/version", auth=_wrong(f"spray-{i}"), source_ip=nat)
    sprayed = stack.get("/version", auth=_wrong("spray-x"), source_ip=nat)
    assert sprayed.status_code == 429 and nat in sprayed.text
    # dave changes his password (no cached login to lean on) and still gets in from there.
    new_password = secrets.token_urlsafe(12)
    stack.users.set_password(dave[0], new_password)
    assert stack.get("/version", auth=(dave[0], new_password), source_ip=nat).status_code == 200
    # A name that never logged in from that address waits, like the attacker's next guess.
    assert stack.get("/version", auth=erin, source_ip=nat).status_code == 429
    assert stack.get("/version", auth=erin, source_ip=fresh_source_ip()).status_code == 200


def test_a_botnet_reaches_the_per_name_ceiling_and_still_cannot_lock_the_name(
    stack: RunningStack,
) -> None:
    frank = stack.new_user("frank")
    bots = [fresh_source_ip() for _ in range(20 * LIMIT)]
    for bot in bots:  # one guess per address: no per-address limit is ever reached
        assert stack.get("/version", auth=_wrong(frank[0]), source_ip=bot).status_code == 401
    again = stack.get("/version", auth=_wrong(frank[0]), source_ip=bots[0])
    assert again.status_code == 429
    assert f"'{frank[0]}'" in again.text and "without failures are not refused" in again.text
    # frank, from an address that has not been failing, is never refused.
    assert stack.get("/version", auth=frank, source_ip=fresh_source_ip()).status_code == 200
    # A fresh bot gets its one guess (401), not a lockout of the name.
    assert (
        stack.get("/version", auth=_wrong(frank[0]), source_ip=fresh_source_ip()).status_code == 401
    )
