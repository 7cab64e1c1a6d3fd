"""API tokens through the real stack: `trackgate tokens`, the MLflow client with
MLFLOW_TRACKING_TOKEN, revocation, expiry, the role limit and the audit log."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from trackgate.roles import RolesStore

from .support import RunningStack, clean_env, trackgate

CURRENT = "/ajax-api/2.0/mlflow/users/current"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def tokens(stack: RunningStack, *args: str) -> subprocess.CompletedProcess[str]:
    return trackgate("tokens", *args, "--data-dir", str(stack.settings.data_dir))


def create(stack: RunningStack, user: str, name: str, *extra: str) -> str:
    result = tokens(stack, "create", "--user", user, "--name", name, *extra)
    assert result.returncode == 0, result.stderr
    assert "shown only now" in result.stderr
    return result.stdout.strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_token_is_printed_once_and_only_its_hash_is_stored(stack: RunningStack) -> None:
    name, _ = stack.new_user("stored")
    token = create(stack, name, "ci")
    assert token.startswith("tg_") and len(token) > 40
    assert token not in stack.settings.tokens_file.read_text()
    listed = tokens(stack, "list", "--user", name)
    assert listed.returncode == 0 and f"{name}  ci" in listed.stdout
    assert token not in listed.stdout
    again = tokens(stack, "create", "--user", name, "--name", "ci")
    assert again.returncode == 1 and "already has a token named 'ci'" in again.stderr
    for bad, message in ((["--user", "nobody-here", "--name", "x"], "no user"),
                         (["--user", name, "--name", "x", "--expires", "soon"], "--expires"),
                         (["--user", name, "--name", "a b"], "token name")):
        refused = tokens(stack, "create", *bad)
        assert refused.returncode == 1 and message in refused.stderr
        assert "Traceback" not in refused.stderr


def test_the_mlflow_client_logs_with_mlflow_tracking_token_and_the_audit_names_it(
        stack: RunningStack) -> None:
    name, _ = stack.new_user("client")
    token = create(stack, name, "training-ci")
    code = ("import mlflow\nmlflow.set_experiment('token-experiment')\n"
            "with mlflow.start_run():\n    mlflow.log_metric('loss', 0.5)\n")
    env = clean_env(MLFLOW_TRACKING_URI=stack.url, MLFLOW_TRACKING_TOKEN=token,
                    MLFLOW_TRACKING_SERVER_CERT_PATH=str(stack.ca))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert stack.settings.audit_log is not None
    events = [json.loads(line) for line in stack.settings.audit_log.read_text().splitlines()]
    mine = [e for e in events if e.get("user") == name and e.get("event") == "request"]
    assert mine and all(e.get("via") == "token:training-ci" for e in mine), mine[-3:]


def test_a_revoked_token_gets_401_on_the_next_call(stack: RunningStack) -> None:
    name, _ = stack.new_user("revoked")
    token = create(stack, name, "ci")
    assert stack.get(SEARCH, headers=bearer(token)).status_code == 200
    result = tokens(stack, "revoke", "--user", name, "--name", "ci")
    assert result.returncode == 0, result.stderr
    refused = stack.get(SEARCH, headers=bearer(token))
    assert refused.status_code == 401
    again = tokens(stack, "revoke", "--user", name, "--name", "ci")
    assert again.returncode == 1 and "no token named 'ci'" in again.stderr


def test_an_expired_token_gets_401(stack: RunningStack) -> None:
    name, _ = stack.new_user("expiring")
    token = create(stack, name, "short", "--expires", "3s")
    assert stack.get(SEARCH, headers=bearer(token)).status_code == 200
    deadline = time.monotonic() + 30
    while stack.get(SEARCH, headers=bearer(token)).status_code == 200:
        assert time.monotonic() < deadline, "the token never expired"
        time.sleep(0.5)
    assert stack.get(SEARCH, headers=bearer(token)).status_code == 401
    assert "(expired)" in tokens(stack, "list", "--user", name).stdout


def test_a_token_carries_at_most_its_users_role(stack: RunningStack) -> None:
    name, _ = stack.new_user("limited")
    roles = RolesStore(stack.settings.roles_file)
    roles.set(name, "editor")
    above = create(stack, name, "asks-admin", "--role", "admin")
    below = create(stack, name, "reader", "--role", "viewer")
    plain = create(stack, name, "plain")

    def role(token: str) -> str:
        answer = stack.get(CURRENT, headers=bearer(token))
        assert answer.status_code == 200, answer.text
        return str(answer.json()["user"]["role"])

    assert (role(above), role(below), role(plain)) == ("editor", "viewer", "editor")
    write = stack.request("POST", "/api/2.0/mlflow/experiments/create", headers=bearer(below),
                          json={"name": f"by-reader-{name}"})
    assert write.status_code == 403, write.text
    roles.set(name, "viewer")  # the user's role drops: every token's with it
    assert (role(above), role(plain)) == ("viewer", "viewer")


def test_removing_the_user_ends_its_tokens(stack: RunningStack) -> None:
    name, _ = stack.new_user("removed")
    token = create(stack, name, "ci")
    assert stack.get(SEARCH, headers=bearer(token)).status_code == 200
    result = trackgate("users", "remove", name, "--data-dir", str(stack.settings.data_dir))
    assert result.returncode == 0 and "revoked 1 token(s)" in result.stdout, result.stderr
    assert stack.get(SEARCH, headers=bearer(token)).status_code == 401
    stack.users.add(name, "same-name-again-123")  # a new user of that name inherits nothing
    assert stack.get(SEARCH, headers=bearer(token)).status_code == 401


@pytest.mark.parametrize("header", ["Bearer tg_forged", "Bearer ", "Bearer " + "x" * 5000])
def test_an_unknown_token_gets_the_401_scripts_get(stack: RunningStack, header: str) -> None:
    answer = stack.get(SEARCH, headers={"Authorization": header})
    assert answer.status_code in (401, 400), answer.status_code


def test_trackgate_check_accepts_a_token_and_explains_a_revoked_one(stack: RunningStack) -> None:
    name, _ = stack.new_user("checked")
    token = create(stack, name, "ci")
    env = {"MLFLOW_TRACKING_URI": stack.url, "MLFLOW_TRACKING_TOKEN": token,
           "MLFLOW_TRACKING_SERVER_CERT_PATH": str(stack.ca)}
    ok = trackgate("check", env=env)
    assert ok.returncode == 0 and "accepts an API token" in ok.stdout, ok.stdout + ok.stderr
    assert tokens(stack, "revoke", "--user", name, "--name", "ci").returncode == 0
    refused = trackgate("check", env=env)
    assert refused.returncode != 0
    assert "TOKEN) is unknown, revoked or expired" in refused.stdout + refused.stderr
