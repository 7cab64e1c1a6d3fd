"""The profile "serving" of compose/: a model registered with the MLflow client is served by its
own container, published by nginx at /serving/NAME/ behind the login, and unreachable except
through nginx; stopped, it answers 503 (never a 502)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from ..test_served_models import MODEL_CODE, PAYLOAD, REGISTER_SCRIPT
from .conftest import SERVED_MODEL
from .harness import ComposeStack
from .test_compose import _client

pytestmark = pytest.mark.compose

@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)  # CI time: one backend is enough
def test_the_serving_profile_serves_a_registered_model_behind_the_login_and_stops_cleanly(
    stack: ComposeStack, tmp_path: Path,
) -> None:
    registered = f"served-{secrets.token_hex(3)}"
    (tmp_path / "model.py").write_text(MODEL_CODE, encoding="utf-8")
    _client(stack, REGISTER_SCRIPT, str(tmp_path / "model.py"), registered, cwd=tmp_path)
    # The container downloads it through nginx as a viewer: the least an account needs.
    viewer, password = f"serving-{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    stack.project.exec("gateway", "trackgate", "users", "add", viewer, "--role", "viewer",
                       "--password-stdin", input=password + "\n")
    env_file = stack.project.env_file
    before = env_file.read_text()
    env_file.write_text(before + f"TRACKGATE_SERVE_MODEL_URI=models:/{registered}@champion\n"
                        f"TRACKGATE_SERVE_MODEL_USERNAME={viewer}\n"
                        f"TRACKGATE_SERVE_MODEL_PASSWORD={password}\n")
    path = f"/serving/{SERVED_MODEL}/invocations"
    try:
        stack.project.run("up", "--detach", "--wait", "--wait-timeout", "240", "--no-build",
                          "--no-deps", "serving")
        answer = stack.request("POST", path, json=PAYLOAD, auth=("admin", stack.admin_password))
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == [{"x": 2}, {"x": 4}]
        refused = stack.request("POST", path, json=PAYLOAD)
        assert refused.status_code == 401
        assert "predictions" not in refused.text

        # The model is hostile code: on its only network there is nothing but nginx (no
        # tracking server to send a forged identity to), and as `nobody` it reads none of the
        # credentials its container was given.
        direct = stack.project.exec("serving", "bash", "-c", "exec 3<>/dev/tcp/tracking/5000",
                                    check=False)
        assert direct.returncode != 0, "the model's container reached the tracking server"
        snoop = stack.project.exec(
            # env -i: `docker exec` hands the container's own variables to what it runs.
            "serving", "env", "-i", "setpriv", "--reuid=nobody", "--regid=nogroup",
            "--clear-groups", "bash",
            "-c", "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n'",
            check=False)
        assert password not in snoop.stdout
        owners = stack.project.exec(
            "serving", "bash", "-c", "for p in /proc/[0-9]*; do grep -qs '[u]vicorn' "
            "$p/cmdline && stat -c %U $p; done; true").stdout.split()
        assert owners and set(owners) == {"nobody"}, owners

        stack.project.run("stop", "serving")
        stopped = stack.request("POST", path, json=PAYLOAD, auth=("admin", stack.admin_password))
        assert stopped.status_code == 503, stopped.text
        assert f"the model {SERVED_MODEL} is not running" in stopped.json()["message"]
    finally:
        stack.project.run("rm", "--stop", "--force", "serving", check=False)
        env_file.write_text(before)
