"""Workflow 6: the team SDK (trackgate.sdk) that training scripts wrap MLflow with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from trackgate import client, sdk

from ..support import RunningStack
from .conftest import EXAMPLES, run_example, unique

# --- parameters files ------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_load_params_reads_yaml_and_json_alike(tmp_path: Path, suffix: str) -> None:
    expected = {"experiment": "x", "model": {"alpha": 0.5, "fit_intercept": True}}
    path = tmp_path / f"params{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(expected))
    else:
        path.write_text("experiment: x\nmodel:\n  alpha: 0.5\n  fit_intercept: true\n")
    assert sdk.load_params(path) == expected


def test_example_params_file_loads(tmp_path: Path) -> None:
    params = sdk.load_params(EXAMPLES / "params.yaml")
    assert params["model"]["alpha"] == 0.5 and params["split"]["random_state"] == 0


@pytest.mark.parametrize(("name", "text", "error"), [
    ("params.toml", "a = 1", "must be a .yaml, .yml or .json file"),
    ("params.yaml", "- a\n- b\n", "expected a mapping"),
    ("params.json", "[1, 2]", "expected a mapping"),
])
def test_load_params_refuses_what_it_cannot_use(tmp_path: Path, name: str, text: str,
                                                error: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(error)):
        sdk.load_params(path)


# --- credentials -----------------------------------------------------------------------------

@pytest.fixture
def no_saved_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither a ./.env nor a `trackgate login` file of the developer is read."""
    monkeypatch.setattr(client, "USER_ENV_FILE", tmp_path / "no-login.env")
    monkeypatch.chdir(tmp_path)


def test_configure_without_a_server_says_how_to_set_one(no_saved_login: None) -> None:
    with pytest.raises(sdk.ClientError, match="no tracking server configured: export "
                                              "MLFLOW_TRACKING_URI"):
        sdk.configure()


def test_configure_with_username_but_no_password_says_which_is_missing(
        no_saved_login: None, monkeypatch: pytest.MonkeyPatch, stack: RunningStack) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    with pytest.raises(sdk.ClientError, match="'alice' but no password is set"):
        sdk.configure()


def test_configure_with_a_wrong_password_fails_before_any_run(
        no_saved_login: None, monkeypatch: pytest.MonkeyPatch, strict_stack: RunningStack) -> None:
    user, _ = strict_stack.new_user("sdk")
    env = strict_stack.client_env(user, "not-the-password")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    experiment = unique("never-created")
    with pytest.raises(sdk.ClientError, match=f"401: wrong username or password for '{user}'"), \
            sdk.training_run(experiment, autolog=False):
        pytest.fail("the block must not run with wrong credentials")
    for name, value in strict_stack.client_env().items():  # look as admin
        monkeypatch.setenv(name, value)
    assert MlflowClient().get_experiment_by_name(experiment) is None


def test_configure_without_the_ca_explains_the_tls_failure(
        no_saved_login: None, monkeypatch: pytest.MonkeyPatch, stack: RunningStack) -> None:
    for name, value in stack.client_env().items():
        if name != "MLFLOW_TRACKING_SERVER_CERT_PATH":
            monkeypatch.setenv(name, value)
    with pytest.raises(sdk.ClientError, match="MLFLOW_TRACKING_SERVER_CERT_PATH"):
        sdk.configure()


# --- runs ------------------------------------------------------------------------------------

def test_get_or_create_experiment_is_idempotent(exported_credentials: None,
                                                no_saved_login: None) -> None:
    name = unique("sdk-exp")
    first = sdk.get_or_create_experiment(name, tags={"team": "ml"})
    assert sdk.get_or_create_experiment(name) == first
    assert MlflowClient().get_experiment(first).tags["team"] == "ml"


def test_sdk_example_logs_params_script_and_only_the_model_files_it_wrote(
        stack: RunningStack, mlflow_client: MlflowClient, tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "last-week.pkl").write_bytes(b"an old model: not written by this run")
    result = run_example(stack, "sdk_train.py", "--out", str(out),
                         "--experiment", unique("sdk"), cwd=tmp_path)
    run_id = re.search(r"run: (\w+)", result.stdout).group(1)  # type: ignore[union-attr]

    run = mlflow_client.get_run(run_id)
    assert run.data.params["model.alpha"] == "0.5"  # nested parameters, dotted
    assert run.data.params["split.test_size"] == "0.25"
    assert "solver" in run.data.params  # autolog's view of the estimator
    assert "test_r2" in run.data.metrics
    assert run.data.tags["trackgate.script"] == "sdk_train.py"
    assert [a.path for a in mlflow_client.list_artifacts(run_id, "code")] == ["code/sdk_train.py"]
    assert [a.path for a in mlflow_client.list_artifacts(run_id, "model_files")] == [
        "model_files/model.joblib"]
    logged = mlflow_client.download_artifacts(run_id, "code/sdk_train.py", str(tmp_path))
    assert Path(logged).read_text() == (EXAMPLES / "sdk_train.py").read_text()


def test_training_run_marks_the_run_failed_and_keeps_the_error(
        exported_credentials: None, no_saved_login: None, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="diverged"), \
            sdk.training_run(unique("sdk-fail"), params={"lr": 10}, autolog=False,
                             model_dirs=[tmp_path]) as run:
        (tmp_path / "partial.pt").write_bytes(b"weights")
        raise RuntimeError("loss diverged")
    finished = MlflowClient().get_run(run.info.run_id)
    assert finished.info.status == "FAILED"
    assert finished.data.params == {"lr": "10"}
    # Called from this test file, so this file is the logged code.
    assert finished.data.tags["trackgate.script"] == Path(__file__).name
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "model_files")] == [
        "model_files/partial.pt"]  # the checkpoint of a failed run is kept for inspection
    assert mlflow.active_run() is None
