"""The policy layer on its own (no server): which requests reach MLflow's handlers, and that the
table of rules covers every endpoint that lets a client name a server-side location."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from trackgate.server.policy import (
    READ_ONLY_GRAPHQL_MUTATIONS,
    RULES,
    Policy,
    is_under_root,
)
from werkzeug.test import Client, EnvironBuilder

BAD_LOCATIONS = [
    "file:///etc",
    "file:/etc",
    "file://localhost/etc",
    "/etc",
    "/var/lib/trackgate/artifacts",
    "etc",
    "./mlruns",
    "../outside",
    " ",
    "mlflow-artifacts:/../etc",
    "mlflow-artifacts:/a/../../etc",
    "mlflow-artifacts:/a/%2e%2e/%2e%2e/etc",
    "mlflow-artifacts:/a//b",
    "mlflow-artifacts:/a/./b",
    "mlflow-artifacts:/a\\..\\b",
    "mlflow-artifacts://evil.example/x",
    "MLFLOW-ARTIFACTS:/x",
    "mlflow-artifacts:x",
    "mlflow-artifacts:",
    "mlflow-artifacts:/x?y=1",
    "mlflow-artifacts:/x#y",
    "mlflow-artifacts:/x;y",
    "s3://other-bucket/x",
    "http://169.254.169.254/latest",
]
GOOD_LOCATIONS = ["mlflow-artifacts:/", "mlflow-artifacts:/team-a", "mlflow-artifacts:/a/b/c/"]


class Recorder:
    """Stands in for MLflow: records what reached it, and the body it read."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        self.calls.append((environ["PATH_INFO"], body))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]


@pytest.fixture(scope="module")
def url_map() -> Any:
    from mlflow.server import app

    return app.url_map


@pytest.fixture
def mlflow(url_map: Any) -> tuple[Recorder, Client]:
    recorder = Recorder()
    return recorder, Client(Policy(recorder, url_map=url_map))


@pytest.mark.parametrize("location", BAD_LOCATIONS)
@pytest.mark.parametrize("prefix", ["/api/2.0/mlflow", "/ajax-api/2.0/mlflow"])
@pytest.mark.parametrize("key", ["artifact_location", "artifactLocation"])
def test_experiment_locations_outside_the_artifact_root_never_reach_mlflow(
    mlflow: tuple[Recorder, Client], location: str, prefix: str, key: str
) -> None:
    recorder, client = mlflow
    response = client.post(f"{prefix}/experiments/create", json={"name": "x", key: location})
    assert response.status_code == 400
    assert response.json["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "artifact root" in response.json["message"]
    assert recorder.calls == []


def test_a_double_encoded_body_is_checked_like_mlflow_reads_it(
    mlflow: tuple[Recorder, Client],
) -> None:
    recorder, client = mlflow
    inner = json.dumps({"name": "x", "artifact_location": "file:///etc"})
    response = client.post("/api/2.0/mlflow/experiments/create", json=inner)
    assert response.status_code == 400
    assert recorder.calls == []


@pytest.mark.parametrize("body", [b"[1]", b"{not json", b'"\\"x\\""'])
def test_a_body_the_policy_cannot_read_is_refused(
    mlflow: tuple[Recorder, Client], body: bytes
) -> None:
    recorder, client = mlflow
    response = client.post(
        "/api/2.0/mlflow/experiments/create", data=body, content_type="application/json"
    )
    assert response.status_code == 400
    assert recorder.calls == []


@pytest.mark.parametrize("location", [*GOOD_LOCATIONS, "", None])
def test_locations_under_the_root_pass_with_the_body_unchanged(
    mlflow: tuple[Recorder, Client], location: str | None
) -> None:
    recorder, client = mlflow
    body = json.dumps({"name": "x", "artifact_location": location}).encode()
    response = client.post(
        "/ajax-api/2.0/mlflow/experiments/create", data=body, content_type="application/json"
    )
    assert response.status_code == 200
    assert recorder.calls == [("/ajax-api/2.0/mlflow/experiments/create", body)]


def test_hot_path_calls_pass_without_their_body_being_read(url_map: Any) -> None:
    class Untouchable(io.BytesIO):
        def read(self, *args: Any) -> bytes:
            raise AssertionError("the policy read a body it has no rule for")

    seen = []

    def inner(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b""]

    environ = EnvironBuilder(
        path="/api/2.0/mlflow/runs/log-metric", method="POST", data=b'{"run_id": "r"}'
    ).get_environ()
    environ["wsgi.input"] = Untouchable()
    list(Policy(inner, url_map=url_map)(environ, lambda *a: None))
    assert seen == ["/api/2.0/mlflow/runs/log-metric"]


@pytest.mark.parametrize(
    "source",
    [
        "file:///etc",
        "/etc/shadow",
        "file:/var/lib",
        "s3://bucket/elsewhere",
        "mlflow-artifacts:/../x",
        "runs://host/r/model",
        "runs:/r/../../x",
        "models://host/m/1",
        "http://127.0.0.1:5000/x",
    ],
)
def test_model_version_sources_outside_the_server_store_are_refused(
    mlflow: tuple[Recorder, Client], source: str
) -> None:
    recorder, client = mlflow
    for prefix in ("/api/2.0/mlflow", "/ajax-api/2.0/mlflow"):
        response = client.post(
            f"{prefix}/model-versions/create", json={"name": "m", "source": source}
        )
        assert response.status_code == 400, source
        assert "source" in response.json["message"]
    assert recorder.calls == []


@pytest.mark.parametrize(
    "source",
    [
        "runs:/0123abcd/model",
        "models:/m-0123abcd",
        "models:/name/1",
        "models:/my model@champion",
        "mlflow-artifacts:/1/0123abcd/artifacts/model",
        "dummy-source",
    ],
)
def test_model_version_sources_the_mlflow_client_sends_pass(
    mlflow: tuple[Recorder, Client], source: str
) -> None:
    from mlflow.prompt.constants import _PROMPT_SOURCE_PLACEHOLDERS

    if source == "dummy-source":
        source = sorted(_PROMPT_SOURCE_PLACEHOLDERS)[0]
    recorder, client = mlflow
    response = client.post(
        "/api/2.0/mlflow/model-versions/create", json={"name": "m", "source": source}
    )
    assert response.status_code == 200
    assert len(recorder.calls) == 1


@pytest.mark.parametrize("prefix", ["/api/3.0/mlflow", "/ajax-api/3.0/mlflow"])
def test_workspace_roots_are_held_to_the_artifact_root(
    mlflow: tuple[Recorder, Client], prefix: str
) -> None:
    recorder, client = mlflow
    bad = [
        {"name": "w", "default_artifact_root": "file:///etc"},
        {"name": "w", "trace_archival_config": {"location": "/tmp/x"}},
        {"name": "w", "traceArchivalConfig": {"location": "s3://b/x"}},
    ]
    for body in bad:
        assert client.post(f"{prefix}/workspaces", json=body).status_code == 400
        assert client.patch(f"{prefix}/workspaces/w", json=body).status_code == 400
    assert recorder.calls == []


@pytest.mark.parametrize(
    "query",
    [
        'mutation { createExperiment(name: "x") { id } }',
        "mutation M { a: createExperiment { id } }",
        "mutation { ...F } fragment F on Mutation { createExperiment { id } }",
        "mutation { ... on Mutation { deleteRun { id } } }",
        "query Q { x } mutation { mlflowSearchRuns { x } deleteRun { y } }",
    ],
)
def test_graphql_mutations_other_than_known_reads_are_refused(
    mlflow: tuple[Recorder, Client], query: str
) -> None:
    recorder, client = mlflow
    # JSON escapes cannot hide the keyword: the policy reads the decoded query.
    escaped = json.dumps({"query": query}).replace("mutation", "\\u006dutation").encode()
    for data in (json.dumps({"query": query}).encode(), escaped):
        response = client.post("/graphql", data=data, content_type="application/json")
        assert response.status_code == 400, query
    assert recorder.calls == []


def test_a_graphql_query_that_does_not_parse_is_refused_with_the_parsers_message(
    mlflow: tuple[Recorder, Client]
) -> None:
    recorder, client = mlflow
    response = client.post("/graphql", json={"query": "mutation { createExperiment(name: "})
    assert response.status_code == 400
    assert "invalid GraphQL query: Syntax Error" in response.get_data(as_text=True)
    assert recorder.calls == []


def test_graphql_reads_pass(mlflow: tuple[Recorder, Client]) -> None:
    recorder, client = mlflow
    for query in (
        'query { mlflowGetExperiment(input: {experimentId: "0"}) { experiment { name } } }',
        'mutation S { mlflowSearchRuns(input: {experimentIds: ["0"]}) { runs { info { x } } } }',
    ):
        assert client.post("/graphql", json={"query": query}).status_code == 200
    assert len(recorder.calls) == 2


def test_this_mlflow_has_only_the_graphql_mutations_the_policy_knows_to_be_reads() -> None:
    from mlflow.server.graphql.graphql_schema_extensions import schema

    mutations = set(schema.graphql_schema.mutation_type.fields)
    assert mutations <= READ_ONLY_GRAPHQL_MUTATIONS, (
        f"MLflow added GraphQL mutations {mutations - READ_ONLY_GRAPHQL_MUTATIONS}: review "
        "whether they write, then list them in READ_ONLY_GRAPHQL_MUTATIONS or leave them refused"
    )


def test_every_rule_names_a_real_mlflow_endpoint(url_map: Any) -> None:
    endpoints = {rule.endpoint for rule in url_map.iter_rules()}
    assert set(RULES) <= endpoints


# Request fields (found by walking MLflow's handlers) that look like locations but that the
# server never turns into a file or object it reads or writes; reviewed for MLflow 3.17.2.
NOT_A_SERVER_LOCATION = {
    # Artifact paths relative to a run's or model's root; MLflow refuses '..' itself
    # (validate_path_is_safe) and the root is held by the experiment rule.
    ("_list_artifacts", "path"),
    ("_create_presigned_upload_url", "path"),
    ("_create_presigned_download_url", "path"),
    ("_list_artifacts_mlflow_artifacts", "path"),
    ("_create_multipart_upload_artifact", "path"),
    ("_complete_multipart_upload_artifact", "path"),
    ("_complete_multipart_upload_artifact", "parts.url"),
    ("_abort_multipart_upload_artifact", "path"),
    ("_list_logged_model_artifacts", "artifact_directory_path"),
    # Descriptions of where a dataset came from, stored as text; never opened by the server.
    ("_log_inputs", "datasets.dataset.source_type"),
    ("_log_inputs", "datasets.dataset.source"),
    ("_create_dataset_handler", "source"),
    # Ids and names, not locations.
    ("_start_trace_v3", "trace.trace_info.assessments.source.source_id"),
    ("_create_assessment", "assessment.source.source_id"),
    ("_update_assessment", "assessment.source.source_id"),
    ("_update_assessment", "update_mask.paths"),
    ("_create_issue", "root_causes"),
    ("_create_issue", "source_run_id"),
    ("_create_logged_model", "source_run_id"),
    ("_create_gateway_endpoint_binding", "resource_type"),
    ("_create_gateway_endpoint_binding", "resource_id"),
    ("_delete_gateway_endpoint_binding", "resource_type"),
    ("_delete_gateway_endpoint_binding", "resource_id"),
    ("_list_gateway_endpoint_bindings", "resource_type"),
    ("_list_gateway_endpoint_bindings", "resource_id"),
    ("_create_prompt_optimization_job", "source_prompt_uri"),  # a prompts:/ registry name
    # Outbound URLs (webhooks): not a file the server stores; see the README's security model.
    ("_create_webhook", "url"),
    ("_update_webhook", "url"),
}
CHECKED = {
    ("_create_experiment", "artifact_location"),
    ("_create_model_version", "source"),
    ("_create_workspace_handler", "default_artifact_root"),
    ("_create_workspace_handler", "trace_archival_config.location"),
    ("_update_workspace_handler", "default_artifact_root"),
    ("_update_workspace_handler", "trace_archival_config.location"),
}
_LOCATION_LIKE = re.compile(r"location|uri|source|root|path|url|dir", re.IGNORECASE)


def _location_fields(descriptor: Any, prefix: str = "", depth: int = 0) -> list[str]:
    found: list[str] = []
    if depth > 4:
        return found
    for field in descriptor.fields:
        name = prefix + field.name
        if field.type == FieldDescriptor.TYPE_STRING and _LOCATION_LIKE.search(field.name):
            found.append(name)
        if field.type == FieldDescriptor.TYPE_MESSAGE and not (
            field.message_type.GetOptions().map_entry
        ):
            found.extend(_location_fields(field.message_type, name + ".", depth + 1))
    return found


def test_every_request_field_that_names_a_location_is_checked_or_reviewed() -> None:
    from mlflow.server import handlers

    served = {handler.__name__ for _, handler, _ in handlers.get_endpoints()}
    found = {
        (handler.__name__, name)
        for request_class, handler in handlers.HANDLERS.items()
        if handler.__name__ in served
        for name in _location_fields(request_class.DESCRIPTOR)
    }
    unreviewed = found - CHECKED - NOT_A_SERVER_LOCATION
    assert not unreviewed, f"new location-like request fields to review: {sorted(unreviewed)}"
    assert {endpoint for endpoint, _ in CHECKED} <= set(RULES)


@pytest.mark.parametrize("uri", GOOD_LOCATIONS)
def test_is_under_root_accepts_clean_paths(uri: str) -> None:
    assert is_under_root(uri, "mlflow-artifacts:/")


def test_is_under_root_with_a_prefixed_root() -> None:
    assert is_under_root("s3://bucket/prefix/a", "s3://bucket/prefix")
    assert not is_under_root("s3://bucket/prefixed/a", "s3://bucket/prefix")
    assert not is_under_root("s3://bucket/other", "s3://bucket/prefix/")


@pytest.mark.parametrize("path", ["%2535/run/artifacts/m.pkl", "5/%2e%2e/x", "5/%2E/x", "./5/x",
                                  "5/../x", "5//x", "/5/x", "5\\x", "5/x\x00y", "/"])
def test_artifact_paths_mlflow_would_decode_or_normalize_never_reach_it(
        mlflow: tuple[Recorder, Client], path: str) -> None:
    recorder, client = mlflow
    answer = client.get("/api/2.0/mlflow-artifacts/artifacts/x",
                        query_string={"path": path})  # the listing's ?path=
    assert answer.status_code == 400 and "not plain" in answer.get_data(as_text=True)
    if not path.startswith("/"):  # (a doubled slash in the URL is Flask's redirect)
        assert client.put("/api/2.0/mlflow-artifacts/artifacts/" + path.replace("%", "%25"),
                          data=b"x").status_code in (400, 404)
    assert not recorder.calls


@pytest.mark.parametrize("path", ["", "5/abc/artifacts/model.pkl", "dir/", "a b/100%.txt"])
def test_plain_artifact_paths_pass(mlflow: tuple[Recorder, Client], path: str) -> None:
    recorder, client = mlflow
    assert client.get("/api/2.0/mlflow-artifacts/artifacts",
                      query_string={"path": path}).status_code == 200
    assert len(recorder.calls) == 1


def test_a_get_with_a_body_never_reaches_mlflow(mlflow: tuple[Recorder, Client]) -> None:
    recorder, client = mlflow
    answer = client.get("/api/2.0/mlflow/runs/get", json={"run_id": "a" * 32})
    assert answer.status_code == 400 and "carries no body" in answer.get_data(as_text=True)
    assert client.get("/api/2.0/mlflow/runs/get", query_string={"run_id": "a" * 32}).status_code \
        == 200
    assert len(recorder.calls) == 1


def test_graphql_arguments_are_found_inline_nested_and_in_variables() -> None:
    from trackgate.server.policy import graphql_arguments

    inline = graphql_arguments('{ a(input: {experimentIds: ["5", "6"]}) { b } }', None)
    assert ("experimentIds", ["5", "6"]) in inline
    variables = graphql_arguments("query q($i: In) { a(input: $i) { b } }",
                                  {"i": {"x": [{"experimentId": "7"}]}})
    assert ("experimentId", "7") in variables
