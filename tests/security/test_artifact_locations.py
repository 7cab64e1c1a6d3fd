"""Attack 1 of issue 12: a logged-in user makes the server write (or read) files where it
chooses, by creating an experiment whose artifact location is `file:///etc`, the data dir, and
so on, then uploading an artifact to a run in it. Every path family must refuse it with a 400
in MLflow's error format; locations under the server's own artifact root keep working."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import RunningStack, running_stack

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("policy-stack")) as running:
        yield running


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory anyone may write to: only the policy can keep the server out of it."""
    path = tmp_path_factory.mktemp("victim-dir")
    path.chmod(0o777)
    return path


@pytest.fixture(scope="module")
def user(stack: RunningStack) -> tuple[str, str]:
    return stack.new_user("mallory")


def _bad_locations(stack: RunningStack, target: Path) -> list[str]:
    data = stack.settings.data_dir
    return [
        f"file://{target}",
        f"file:{target}",
        f"file://localhost{target}",
        str(target),
        f"file://{data}",  # the data dir: the database, htpasswd and TLS keys live there
        str(data / "run"),
        f"{target}/../{target.name}",
        "mlflow-artifacts:/../../etc",
        "mlflow-artifacts:/x/%2e%2e/%2e%2e/etc",
        "relative-dir",
    ]


@pytest.mark.parametrize("family", ["/api/2.0/mlflow", "/ajax-api/2.0/mlflow"])
def test_experiments_outside_the_artifact_root_are_refused_on_every_path_family(
    stack: RunningStack, target: Path, user: tuple[str, str], family: str
) -> None:
    for location in _bad_locations(stack, target):
        name = f"evil-{secrets.token_hex(4)}"
        for key in ("artifact_location", "artifactLocation"):
            response = stack.request(
                "POST",
                f"{family}/experiments/create",
                auth=user,
                json={"name": name, key: location},
            )
            assert response.status_code == 400, (location, response.text)
            error = response.json()
            assert error["error_code"] == "INVALID_PARAMETER_VALUE"
            assert "artifact root" in error["message"] and location in error["message"]
        found = stack.get(f"{family}/experiments/get-by-name?experiment_name={name}", auth=user)
        assert found.status_code == 404, "the experiment must not have been created"
    assert list(target.iterdir()) == []


def test_the_full_attack_writes_nothing_outside_and_the_artifact_root_still_works(
    stack: RunningStack, target: Path, user: tuple[str, str]
) -> None:
    api = "/api/2.0/mlflow"
    refused = stack.request(
        "POST",
        f"{api}/experiments/create",
        auth=user,
        json={"name": f"evil-{secrets.token_hex(4)}", "artifact_location": f"file://{target}"},
    )
    assert refused.status_code == 400
    # Where a user may choose a place: below the server's own root.
    created = stack.request(
        "POST",
        f"{api}/experiments/create",
        auth=user,
        json={
            "name": f"ok-{secrets.token_hex(4)}",
            "artifact_location": "mlflow-artifacts:/team-sec",
        },
    )
    assert created.status_code == 200, created.text
    experiment_id = created.json()["experiment_id"]
    run = stack.request(
        "POST", f"{api}/runs/create", auth=user, json={"experiment_id": experiment_id}
    )
    assert run.status_code == 200, run.text
    run_id = run.json()["run"]["info"]["run_id"]
    upload = stack.request(
        "POST",
        f"/ajax-api/2.0/mlflow/upload-artifact?run_uuid={run_id}&path=x.txt",
        auth=user,
        data=b"payload",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert upload.status_code == 200, upload.text
    # (MLflow's upload-artifact files proxied runs under EXPERIMENT_ID/RUN_ID, not the location.)
    stored = list(Path(stack.settings.artifacts_uri).rglob(f"{run_id}/artifacts/x.txt"))
    assert [p.read_bytes() for p in stored] == [b"payload"]
    assert list(target.iterdir()) == []


def test_the_default_experiment_lives_under_the_artifact_root(
    stack: RunningStack, user: tuple[str, str]
) -> None:
    response = stack.get("/api/2.0/mlflow/experiments/get?experiment_id=0", auth=user)
    assert response.status_code == 200
    assert response.json()["experiment"]["artifact_location"].startswith("mlflow-artifacts:/")


def test_the_mlflow_client_shows_the_reason(
    stack: RunningStack, target: Path, user: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    for key, value in stack.client_env(*user).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException, match="artifact root"):
        MlflowClient().create_experiment(f"evil-{secrets.token_hex(4)}", f"file://{target}")


@pytest.mark.parametrize("family", ["/api/2.0/mlflow", "/ajax-api/2.0/mlflow"])
def test_model_versions_cannot_point_the_server_at_its_own_files(
    stack: RunningStack, user: tuple[str, str], family: str
) -> None:
    model = f"model-{secrets.token_hex(4)}"
    created = stack.request(
        "POST", f"{family}/registered-models/create", auth=user, json={"name": model}
    )
    assert created.status_code == 200, created.text
    htpasswd = stack.settings.htpasswd
    for source in (
        f"file://{htpasswd}",
        str(htpasswd.parent),
        f"file:{htpasswd.parent}",
        "s3://some-bucket/elsewhere",
        "mlflow-artifacts:/../../",
    ):
        response = stack.request(
            "POST",
            f"{family}/model-versions/create",
            auth=user,
            json={"name": model, "source": source},
        )
        assert response.status_code == 400, (source, response.text)
        assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "source" in response.json()["message"]


def test_graphql_offers_no_way_around(stack: RunningStack, user: tuple[str, str]) -> None:
    # This MLflow's GraphQL schema has no mutation that writes (test_policy walks it); any
    # mutation the policy does not know to be a read is refused.
    refused = stack.request(
        "POST",
        "/graphql",
        auth=user,
        json={"query": 'mutation { createExperiment(artifactLocation: "file:///etc") { id } }'},
    )
    assert refused.status_code == 400
    # A query the parser cannot read is refused by the policy layer, never handed to MLflow.
    unparsable = stack.request(
        "POST", "/graphql", auth=user, json={"query": "mutation { createExperiment(name: "}
    )
    assert unparsable.status_code == 400, unparsable.text
    assert "invalid GraphQL query: Syntax Error" in unparsable.text
    read = stack.request(
        "POST",
        "/graphql",
        auth=user,
        json={
            "query": 'query { mlflowGetExperiment(input: {experimentId: "0"}) '
            "{ experiment { artifactLocation } } }"
        },
    )
    assert read.status_code == 200, read.text
    location = read.json()["data"]["mlflowGetExperiment"]["experiment"]["artifactLocation"]
    assert location.startswith("mlflow-artifacts:/")


@pytest.mark.parametrize("family", ["/api/3.0/mlflow", "/ajax-api/3.0/mlflow"])
def test_workspace_roots_cannot_leave_the_artifact_root(
    stack: RunningStack, user: tuple[str, str], family: str
) -> None:
    response = stack.request(
        "POST",
        f"{family}/workspaces",
        auth=user,
        json={"name": "w", "default_artifact_root": f"file://{os.sep}etc"},
    )
    assert response.status_code == 400
    assert "artifact root" in response.json()["message"]
