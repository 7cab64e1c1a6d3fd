"""Revocation latency is zero: while a client keeps sending a cached credential as fast as it can,
`trackgate users passwd` / `remove` / `set-role` change what the very next request gets. Every
request that starts after the command returned is judged by the new state (issue 18: no answer
cache in nginx may outlive a change)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .support import RunningStack, fresh_source_ip, session_from, trackgate


class Hammer:
    """One keep-alive client repeating one request; (start time, status) of each answer."""

    def __init__(self, stack: RunningStack, method: str, path: str,
                 auth: tuple[str, str], **kwargs: object) -> None:
        self.answers: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._args = (stack, method, path, auth, kwargs)

    def run(self) -> None:
        stack, method, path, auth, kwargs = self._args
        # Its own source address: its refusals count against no other test's client.
        with session_from(fresh_source_ip()) as session:
            while not self._stop.is_set():
                began = time.monotonic()
                answer = session.request(method, stack.url + path, auth=auth, timeout=30,
                                         verify=str(stack.ca), **kwargs)
                self.answers.append((began, answer.status_code))

    @contextmanager
    def running(self) -> Iterator[Hammer]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not self.answers and time.monotonic() < deadline:
                time.sleep(0.01)
            yield self
        finally:
            self._stop.set()
            thread.join(60)

    def after(self, moment: float) -> list[int]:
        return [status for began, status in self.answers if began >= moment]

    def wait_for_answers_after(self, moment: float, count: int = 5) -> None:
        deadline = time.monotonic() + 30
        while len(self.after(moment)) < count and time.monotonic() < deadline:
            time.sleep(0.01)


def _cli(stack: RunningStack, *args: str, input: str | None = None) -> float:
    """Run `trackgate users ...`; the moment it returned."""
    result = trackgate("users", *args, "--data-dir", str(stack.settings.data_dir), input=input)
    assert result.returncode == 0, result.stderr
    return time.monotonic()


def test_the_old_password_is_refused_by_the_first_request_after_passwd_returns(
    stack: RunningStack,
) -> None:
    name, old = stack.new_user("revoked")
    new = secrets.token_urlsafe(12)
    with Hammer(stack, "GET", "/version", (name, old)).running() as hammer:
        returned = _cli(stack, "passwd", name, "--password-stdin", input=new + "\n")
        hammer.wait_for_answers_after(returned)
    before = [status for began, status in hammer.answers if began < returned]
    assert 200 in before, "the old password worked (from the cache) until the change"
    after = hammer.after(returned)
    # 401, then 429 once the failures trip the throttle: refused either way, never 200.
    assert after and after[0] == 401 and set(after) <= {401, 429}, after
    assert stack.get("/version", auth=(name, new)).status_code == 200


def test_a_removed_user_is_refused_by_the_first_request_after_remove_returns(
    stack: RunningStack,
) -> None:
    name, password = stack.new_user("removed")
    with Hammer(stack, "GET", "/version", (name, password)).running() as hammer:
        returned = _cli(stack, "remove", name)
        hammer.wait_for_answers_after(returned)
    after = hammer.after(returned)
    assert after and after[0] == 401 and set(after) <= {401, 429}, after


def test_a_lowered_role_applies_to_the_first_request_after_set_role_returns(
    stack: RunningStack,
) -> None:
    name, password = stack.new_user("demoted")
    assert _cli(stack, "set-role", name, "editor")
    body = {"name": f"demoted-{secrets.token_hex(4)}"}
    with Hammer(stack, "POST", "/api/2.0/mlflow/experiments/create", (name, password),
                json=body).running() as hammer:
        returned = _cli(stack, "set-role", name, "viewer")
        hammer.wait_for_answers_after(returned)
    before = {status for began, status in hammer.answers if began < returned}
    assert before & {200, 400}, "as an editor the writes reached MLflow (200, then 400 exists)"
    after = hammer.after(returned)
    assert after and set(after) == {403}, f"answers after set-role returned: {after}"
