"""The auth gateway behind nginx: bcrypt once, then memory; changes apply at once; failures
are throttled with 429; identity cannot be injected; a dead gateway fails closed."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path

import pytest
from trackgate.local.probe import internal_connection
from trackgate.local.supervisor import state_file

from .support import RunningStack, fresh_source_ip


def gateway_stats(stack: RunningStack) -> dict[str, int]:
    # The gateway's own socket: operators' view, never exposed by nginx.
    conn = internal_connection(stack.settings.gateway_address, timeout=10)
    try:
        conn.request("GET", "/stats")
        return json.loads(conn.getresponse().read())  # type: ignore[no-any-return]
    finally:
        conn.close()


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before if isinstance(before[k], int)}


def test_a_verified_credential_runs_bcrypt_once_then_is_answered_from_memory(
    stack: RunningStack,
) -> None:
    user = stack.new_user("cached")
    before = gateway_stats(stack)
    for _ in range(5):
        assert stack.get("/version", auth=user).status_code == 200
    change = delta(before, gateway_stats(stack))
    assert change["bcrypt_checks"] == 1
    assert change["cache_hits"] == 4


def test_a_wrong_password_is_never_cached_as_success(stack: RunningStack) -> None:
    name, password = stack.new_user("typo")
    source = fresh_source_ip()
    before = gateway_stats(stack)
    for _ in range(3):
        assert (
            stack.get("/version", auth=(name, password + "!"), source_ip=source).status_code == 401
        )
    change = delta(before, gateway_stats(stack))
    assert change["bcrypt_checks"] == 3
    assert change["cache_hits"] == 0
    assert change["refused"] == 3


def test_unknown_users_cost_a_bcrypt_check_like_known_ones(stack: RunningStack) -> None:
    # No user enumeration by timing: an unknown name is checked against a decoy hash.
    before = gateway_stats(stack)
    response = stack.get("/version", auth=(f"ghost-{secrets.token_hex(3)}", "pw"))
    assert response.status_code == 401
    assert delta(before, gateway_stats(stack))["bcrypt_checks"] == 1


def test_a_password_change_locks_the_old_password_out_on_the_next_request(
    stack: RunningStack,
) -> None:
    name, old = stack.new_user("rotating")
    source = fresh_source_ip()
    assert (
        stack.get("/version", auth=(name, old), source_ip=source).status_code == 200
    )  # cached now
    new = secrets.token_urlsafe(12)
    stack.users.set_password(name, new)
    assert stack.get("/version", auth=(name, old), source_ip=source).status_code == 401
    assert stack.get("/version", auth=(name, new), source_ip=source).status_code == 200


def test_another_users_change_keeps_cached_logins_valid(stack: RunningStack) -> None:
    user = stack.new_user("steady")
    assert stack.get("/version", auth=user).status_code == 200
    stack.new_user("newcomer")  # rewrites the file
    before = gateway_stats(stack)
    assert stack.get("/version", auth=user).status_code == 200
    assert delta(before, gateway_stats(stack))["cache_hits"] == 1


def test_repeated_failures_get_429_with_retry_after_and_spare_other_clients(
    stack: RunningStack,
) -> None:
    victim_name, victim_password = stack.new_user("victim")
    bystander = stack.new_user("bystander")
    attacker_ip = fresh_source_ip()
    # A logged-in user on the attacker's own address (e.g. behind the same NAT).
    assert (
        stack.get(
            "/version", auth=(victim_name, victim_password), source_ip=attacker_ip
        ).status_code
        == 200
    )
    limit = stack.settings.failure_limit
    codes = [
        stack.get("/version", auth=(f"guess-{i}", "wrong"), source_ip=attacker_ip).status_code
        for i in range(limit)
    ]
    assert codes == [401] * limit
    throttled = stack.get("/version", auth=("guess-x", "wrong"), source_ip=attacker_ip)
    assert throttled.status_code == 429
    assert 0 < int(throttled.headers["Retry-After"]) <= stack.settings.failure_window
    # Even the right password for a new login from that address waits: it costs no bcrypt.
    assert stack.get("/version", auth=bystander, source_ip=attacker_ip).status_code == 429
    # Others are untouched: another address logs in, and a cached login keeps working.
    assert stack.get("/version", auth=bystander, source_ip=fresh_source_ip()).status_code == 200
    assert (
        stack.get(
            "/version", auth=(victim_name, victim_password), source_ip=attacker_ip
        ).status_code
        == 200
    )


def test_failures_against_one_username_from_many_addresses_do_not_lock_it_out(
    stack: RunningStack,
) -> None:
    # Locking a name would let anyone lock anybody out; the per-name ceiling is far higher and
    # spares addresses without failures (tests/security/test_lockout.py).
    name, password = stack.new_user("targeted")
    limit = stack.settings.failure_limit
    for _ in range(limit + 1):
        assert (
            stack.get("/version", auth=(name, "guess"), source_ip=fresh_source_ip()).status_code
            == 401
        )
    assert (
        stack.get("/version", auth=(name, password), source_ip=fresh_source_ip()).status_code == 200
    )


def test_client_supplied_identity_headers_never_reach_mlflow(stack: RunningStack) -> None:
    name, password = stack.new_user("honest")
    marker = secrets.token_hex(6)
    spoofed = {"X-Trackgate-User": "mallory", "X-Remote-User": "mallory", "Remote-User": "mallory"}
    assert (
        stack.get(f"/version?probe={marker}", auth=(name, password), headers=spoofed).status_code
        == 200
    )
    no_auth = stack.get(f"/version?probe={marker}-anon", headers=spoofed)
    assert no_auth.status_code == 401
    log = Path(stack.settings.logs or "", "tracking-access.log")
    deadline = time.monotonic() + 10
    while marker not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [line for line in log.read_text().splitlines() if marker in line]
    assert len(lines) == 1, lines  # the unauthenticated one never reached MLflow
    assert f"user={name} " in lines[0]
    assert "mallory" not in lines[0]


def _gateway_pids(stack: RunningStack) -> list[int]:
    master = json.loads(state_file(stack.settings).read_text())["gateway"]["pid"]
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [master, *map(int, children)]


def test_a_dead_gateway_fails_closed_then_recovers(stack: RunningStack) -> None:
    user = stack.new_user("during-outage")
    assert stack.get("/version", auth=user).status_code == 200
    for pid in _gateway_pids(stack):  # the gateway master and its worker, by PID
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    during = stack.get("/version", auth=user)
    assert during.status_code >= 500, "no request may pass while the gateway is down"
    # /health now covers the gateway too (tests/reliability/test_supervisor_kills.py).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if stack.get("/version", auth=user).status_code == 200:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the supervisor did not bring the gateway back within 60 s")
    assert stack.get("/version").status_code == 401
