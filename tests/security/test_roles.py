"""Issue 14: roles enforced on the server, owners recorded by the server, authors stamped from the
verified user, and the audit log -- against a real `trackgate up` stack, through nginx.

- Every endpoint in MLflow's own list (`mlflow.server.handlers.get_endpoints()`, never a hand-kept
  copy) is sent by a viewer, an editor, an admin and a user whose role line is unknown: the
  viewer and the unknown role get the policy's 403 for every write and never for a read, the
  editor only for admin-only endpoints, the admin never.
- The classification covers every route of MLflow's URL map: an MLflow upgrade that adds a
  write endpoint fails this file until someone classifies it (until then it is admin-only).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import requests
from trackgate.roles import RolesStore, roles_path
from trackgate.server.access import READ_METHODS, READ_POSTS, WRITE_KINDS, is_write

from ..support import RunningStack, clean_env, running_stack, session_from, trackgate

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("roles"), bcrypt_rounds=4) as running:
        yield running


def _user(stack: RunningStack, prefix: str, role: str) -> tuple[str, str]:
    name, password = stack.new_user(prefix)
    if role == "unknown":
        # a role line nobody understands: treated as a viewer (fail closed)
        with open(roles_path(stack.settings), "a") as f:
            f.write(f"{name}:superuser\n")
    else:
        RolesStore(roles_path(stack.settings)).set(name, role)
    return name, password


def _refused_by_policy(answer: requests.Response) -> bool:
    if answer.status_code != 403:
        return False
    try:
        body = answer.json()
    except ValueError:
        return False
    return body.get("error_code") == "PERMISSION_DENIED" and "role" in body.get("message", "")


# --- the classification, without a server ----------------------------------------------------


def test_every_write_route_of_mlflow_is_classified() -> None:
    from mlflow.server import app
    from mlflow.server.handlers import get_endpoints

    names = {handler.__name__ for _, handler, _ in get_endpoints()}
    unclassified = sorted(
        {
            f"{rule.endpoint} {sorted(rule.methods - READ_METHODS)} {rule.rule}"
            for rule in app.url_map.iter_rules()
            if rule.methods - READ_METHODS
            and rule.endpoint not in READ_POSTS
            and rule.endpoint not in WRITE_KINDS
        }
    )
    assert not unclassified, (
        "MLflow has write endpoints nobody classified (they are admin-only until added to "
        f"READ_POSTS or WRITE_KINDS in trackgate/server/access.py): {unclassified}"
    )
    stale = sorted((set(WRITE_KINDS) | READ_POSTS) - names - {r.endpoint for r in
                                                              app.url_map.iter_rules()})
    assert not stale, f"classified endpoints this MLflow no longer has: {stale}"


# --- the role matrix through the real proxy --------------------------------------------------


def _concrete(path: str) -> str:
    """An MLflow route with its <placeholders> filled in."""
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", lambda m: f"trackgate-{m.group(1)}", path)


def _endpoints() -> list[tuple[str, str, str]]:
    from mlflow.server.handlers import get_endpoints

    calls = []
    for path, handler, methods in get_endpoints():
        for method in methods:
            calls.append((method, _concrete(path), handler.__name__))
    return sorted(set(calls))


def _send(session: requests.Session, stack: RunningStack, method: str, path: str) -> Any:
    body = None if method in READ_METHODS else {}
    try:
        return session.request(method, stack.url + path, json=body, timeout=10,
                               verify=str(stack.ca))
    except requests.Timeout:
        # MLflow itself is slow here (e.g. it looks up model lists on the internet, which this
        # machine cannot reach): the policy let it through, since its refusals are immediate.
        return None


@pytest.mark.parametrize("role", ["viewer", "unknown", "editor", "admin"])
def test_role_matrix_over_every_mlflow_endpoint(stack: RunningStack, role: str) -> None:
    """403 (the policy's, naming the role) exactly where the role may not go."""
    name, password = _user(stack, f"matrix-{role}", role)
    wrong: list[str] = []
    slow: list[str] = []
    writes = reads = 0
    with session_from() as session:
        session.auth = (name, password)
        for method, path, endpoint in _endpoints():
            write = is_write(endpoint, method)
            kind = WRITE_KINDS.get(endpoint, "admin") if write else None
            if role == "admin" and endpoint in ("_generate_demo", "_invoke_genai_evaluate_handler"):
                continue  # these do real work for an admin (demo data, evaluation jobs)
            answer = _send(session, stack, method, path)
            if answer is None:
                slow.append(f"{method} {path}")
                answer = requests.Response()
                answer.status_code = 504
            refused = _refused_by_policy(answer)
            if role in ("viewer", "unknown"):
                expected = write
            elif role == "editor":
                expected = kind == "admin"
            else:
                expected = False
            writes += write
            reads += not write
            if refused != expected:
                wrong.append(f"{method} {path} ({endpoint}): {answer.status_code} "
                             f"{answer.text[:160]!r}, expected {'403' if expected else 'not 403'}")
    assert writes > 100 and reads > 100
    assert not wrong, "\n".join(wrong)
    assert len(slow) < 5, slow


def test_the_refusal_names_the_user_the_role_and_the_action(stack: RunningStack) -> None:
    name, password = _user(stack, "viewer", "viewer")
    for prefix in ("/api/2.0/mlflow", "/ajax-api/2.0/mlflow"):
        answer = stack.request("POST", f"{prefix}/experiments/create", auth=(name, password),
                               json={"name": "viewer-try"})
        assert answer.status_code == 403
        message = answer.json()["message"]
        assert answer.json()["error_code"] == "PERMISSION_DENIED"
        assert name in message and "'viewer'" in message and "create_experiment" in message
    # a client's own copy of the role (or user) header is dropped by nginx
    forged = stack.request("POST", "/api/2.0/mlflow/experiments/create", auth=(name, password),
                           json={"name": "viewer-forged"},
                           headers={"X-Trackgate-Role": "admin", "X-Trackgate-User": "admin"})
    assert _refused_by_policy(forged) and f"'{name}' has the role 'viewer'" in forged.text
    # artifact uploads are covered too
    answer = stack.request("PUT", "/api/2.0/mlflow-artifacts/artifacts/0/x.txt",
                           auth=(name, password), data=b"x")
    assert _refused_by_policy(answer)


def test_a_role_change_applies_on_the_next_request(stack: RunningStack) -> None:
    name, password = _user(stack, "promoted", "viewer")
    body = {"name": f"promoted-{name}"}
    assert stack.request("POST", "/api/2.0/mlflow/experiments/create", auth=(name, password),
                         json=body).status_code == 403
    result = trackgate("users", "set-role", name, "editor",
                       "--data-dir", str(stack.settings.data_dir))
    assert result.returncode == 0, result.stderr
    assert stack.request("POST", "/api/2.0/mlflow/experiments/create", auth=(name, password),
                         json=body).status_code == 200
    listed = trackgate("users", "list", "--data-dir", str(stack.settings.data_dir)).stdout
    assert f"{name}  editor" in listed.splitlines()
    assert "admin  admin" in listed.splitlines()


# --- owners: what an editor may change -------------------------------------------------------


def _post(stack: RunningStack, auth: tuple[str, str], path: str, body: dict[str, Any],
          method: str = "POST") -> requests.Response:
    return stack.request(method, f"/api/2.0/mlflow/{path}", auth=auth, json=body)


def test_bob_cannot_move_carols_alias_nor_change_her_model_or_runs(stack: RunningStack) -> None:
    carol = _user(stack, "carol", "editor")
    bob = _user(stack, "bob", "editor")
    admin = ("admin", stack.admin_password)
    experiment = _post(stack, carol, "experiments/create", {"name": f"carol-{carol[0]}"})
    experiment_id = experiment.json()["experiment_id"]
    run = _post(stack, carol, "runs/create", {"experiment_id": experiment_id})
    run_id = run.json()["run"]["info"]["run_id"]
    model = f"carol-model-{carol[0]}"
    assert _post(stack, carol, "registered-models/create", {"name": model}).status_code == 200
    for _ in range(2):
        version = _post(stack, carol, "model-versions/create",
                        {"name": model, "source": f"runs:/{run_id}/model", "run_id": run_id})
        assert version.status_code == 200, version.text
    alias = {"name": model, "alias": "champion", "version": "1"}
    assert _post(stack, carol, "registered-models/alias", alias).status_code == 200

    bob_moves = {"name": model, "alias": "champion", "version": "2"}
    refused = [
        _post(stack, bob, "registered-models/alias", bob_moves),
        _post(stack, bob, "registered-models/alias", {"name": model, "alias": "champion"},
              "DELETE"),
        _post(stack, bob, "model-versions/transition-stage",
              {"name": model, "version": "2", "stage": "Production"}),
        _post(stack, bob, "registered-models/delete", {"name": model}, "DELETE"),
        _post(stack, bob, "registered-models/rename", {"name": model, "new_name": "bobs"}),
        _post(stack, bob, "model-versions/create",
              {"name": model, "source": f"runs:/{run_id}/model"}),
        _post(stack, bob, "experiments/delete", {"experiment_id": experiment_id}),
        _post(stack, bob, "experiments/update", {"experiment_id": experiment_id,
                                                  "new_name": "bobs"}),
        _post(stack, bob, "runs/delete", {"run_id": run_id}),
        _post(stack, bob, "runs/log-metric", {"run_id": run_id, "key": "m", "value": 1,
                                              "timestamp": 0}),
        # the owner tag is the server's: bob cannot claim carol's experiment
        _post(stack, bob, "experiments/set-experiment-tag",
              {"experiment_id": experiment_id, "key": "trackgate.owner", "value": bob[0]}),
        stack.request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/"
                      "artifacts/x.txt", auth=bob, data=b"bob was here"),
    ]
    logged = _post(stack, carol, "logged-models", {"experiment_id": experiment_id,
                                                   "name": "carols-logged-model"})
    assert logged.status_code == 200, logged.text
    logged_id = logged.json()["model"]["info"]["model_id"]
    refused += [
        _post(stack, bob, f"logged-models/{logged_id}", {}, "DELETE"),
        _post(stack, bob, f"logged-models/{logged_id}/tags",
              {"tags": [{"key": "stage", "value": "bob"}]}, "PATCH"),
        stack.request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/models/"
                      f"{logged_id}/artifacts/MLmodel", auth=bob, data=b"bob was here"),
        _post(stack, bob, "traces/delete-traces", {"experiment_id": experiment_id,
                                                   "max_timestamp_millis": 2**41}),
    ]
    assert all(_refused_by_policy(a) for a in refused), [a.text for a in refused]
    assert "only its owner" in refused[0].json()["message"]
    assert _post(stack, carol, f"logged-models/{logged_id}",
                 {"model_id": logged_id, "status": "LOGGED_MODEL_READY"},
                 "PATCH").status_code == 200
    got = stack.get(f"/api/2.0/mlflow/registered-models/alias?name={model}&alias=champion",
                    auth=bob)
    assert got.json()["model_version"]["version"] == "1"
    # the owner and an admin may
    assert _post(stack, carol, "registered-models/alias", bob_moves).status_code == 200
    assert _post(stack, admin, "registered-models/alias", alias).status_code == 200
    assert _post(stack, carol, "runs/log-metric", {"run_id": run_id, "key": "m", "value": 1,
                                                   "timestamp": 0}).status_code == 200
    # a model version records its author: tag and user_id, both the verified user
    got = stack.get(f"/api/2.0/mlflow/model-versions/get?name={model}&version=1", auth=bob)
    version = got.json()["model_version"]
    assert version["user_id"] == carol[0]
    assert {"key": "trackgate.author", "value": carol[0]} in version["tags"]


def test_an_owner_grants_edit_then_manage_on_an_experiment_and_a_model(
    stack: RunningStack,
) -> None:
    carol = _user(stack, "carol", "editor")
    bob = _user(stack, "bob", "editor")
    dave = _user(stack, "dave", "editor")
    experiment_id = _post(stack, carol, "experiments/create",
                          {"name": f"shared-{carol[0]}"}).json()["experiment_id"]
    run_id = _post(stack, carol, "runs/create",
                   {"experiment_id": experiment_id}).json()["run"]["info"]["run_id"]
    model = f"shared-model-{carol[0]}"
    _post(stack, carol, "registered-models/create", {"name": model})
    _post(stack, carol, "model-versions/create", {"name": model, "run_id": run_id,
                                                  "source": f"runs:/{run_id}/model"})
    metric = {"run_id": run_id, "key": "m", "value": 1, "timestamp": 0}
    rename = {"experiment_id": experiment_id, "new_name": f"renamed-{carol[0]}"}
    alias = {"name": model, "alias": "champion", "version": "1"}

    def grant(who: tuple[str, str], user: str, level: str, on: str = "experiment") -> Any:
        if on == "experiment":
            return _post(stack, who, "experiments/set-experiment-tag", {
                "experiment_id": experiment_id, "key": f"trackgate.grant.{user}", "value": level})
        return _post(stack, who, "registered-models/set-tag",
                     {"name": model, "key": f"trackgate.grant.{user}", "value": level})

    # nothing granted: bob can neither log to carol's run nor grant himself
    assert _refused_by_policy(_post(stack, bob, "runs/log-metric", metric))
    assert _refused_by_policy(grant(bob, bob[0], "MANAGE"))
    assert grant(carol, bob[0], "ALL").status_code == 400  # levels are READ, EDIT, MANAGE
    # EDIT: bob logs into carol's runs, but does not rename her experiment or grant others
    assert grant(carol, bob[0], "EDIT").status_code == 200
    assert _post(stack, bob, "runs/log-metric", metric).status_code == 200
    answer = _post(stack, bob, "experiments/update", rename)
    assert _refused_by_policy(answer) and "MANAGE" in answer.json()["message"]
    assert _refused_by_policy(grant(bob, dave[0], "EDIT"))
    assert _refused_by_policy(_post(stack, dave, "runs/log-metric", metric))
    # MANAGE: bob renames it
    assert grant(carol, bob[0], "MANAGE").status_code == 200
    assert _post(stack, bob, "experiments/update", rename).status_code == 200
    # models: EDIT adds versions, MANAGE moves aliases
    assert _refused_by_policy(_post(stack, bob, "registered-models/alias", alias))
    assert grant(carol, bob[0], "EDIT", on="model").status_code == 200
    assert _refused_by_policy(_post(stack, bob, "registered-models/alias", alias))
    assert _post(stack, bob, "model-versions/create", {
        "name": model, "run_id": run_id, "source": f"runs:/{run_id}/model"}).status_code == 200
    assert grant(carol, bob[0], "MANAGE", on="model").status_code == 200
    assert _post(stack, bob, "registered-models/alias", alias).status_code == 200
    assert _refused_by_policy(_post(stack, dave, "registered-models/alias", alias))


def test_bob_sees_carols_private_experiment_only_with_read_and_logs_into_it_only_with_edit(
    stack: RunningStack,
) -> None:
    carol = _user(stack, "carol", "editor")
    bob = _user(stack, "bob", "editor")
    name = f"private-{carol[0]}"
    experiment_id = _post(stack, carol, "experiments/create", {
        "name": name, "tags": [{"key": "trackgate.private", "value": "true"}]}).json()[
        "experiment_id"]
    run_id = _post(stack, carol, "runs/create",
                   {"experiment_id": experiment_id}).json()["run"]["info"]["run_id"]
    _post(stack, carol, "runs/log-metric", {"run_id": run_id, "key": "m", "value": 1,
                                            "timestamp": 0})

    def listed(who: tuple[str, str]) -> bool:
        found = _post(stack, who, "experiments/search", {"max_results": 1000}).json()
        return experiment_id in {e["experiment_id"] for e in found.get("experiments", [])}

    def reads(who: tuple[str, str]) -> list[requests.Response]:
        return [
            stack.get(f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}",
                      auth=who),
            stack.get(f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}",
                      auth=who),
            stack.get("/ajax-api/2.0/mlflow/experiments/search?max_results=1000", auth=who),
            _post(stack, who, "runs/search", {"experiment_ids": [experiment_id]}),
            stack.get(f"/api/2.0/mlflow/runs/get?run_id={run_id}", auth=who),
            stack.get(f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=m",
                      auth=who),
            stack.get(f"/api/2.0/mlflow/artifacts/list?run_id={run_id}", auth=who),
            stack.get(f"/api/2.0/mlflow-artifacts/artifacts?path={experiment_id}/{run_id}",
                      auth=who),
            stack.request("POST", "/graphql", auth=who, json={
                "query": "query q($id: String!) { mlflowGetRun(input: {runId: $id}) "
                         "{ run { info { runId } } } }", "variables": {"id": run_id}}),
        ]

    assert listed(carol) and listed(("admin", stack.admin_password))
    assert not listed(bob)
    answers = reads(bob)
    refused = [a for i, a in enumerate(answers) if i != 2]
    assert all(_refused_by_policy(a) and "private" in a.text for a in refused), \
        [(a.status_code, a.text[:120]) for a in refused]
    assert experiment_id not in {e["experiment_id"] for e in answers[2].json()["experiments"]}
    create = {"experiment_id": experiment_id}
    assert _refused_by_policy(_post(stack, bob, "runs/create", create))

    _post(stack, carol, "experiments/set-experiment-tag", {
        "experiment_id": experiment_id, "key": f"trackgate.grant.{bob[0]}", "value": "READ"})
    assert listed(bob)
    assert all(a.status_code == 200 for a in reads(bob)), [a.text[:120] for a in reads(bob)]
    assert _refused_by_policy(_post(stack, bob, "runs/create", create))  # READ: no runs

    _post(stack, carol, "experiments/set-experiment-tag", {
        "experiment_id": experiment_id, "key": f"trackgate.grant.{bob[0]}", "value": "EDIT"})
    assert _post(stack, bob, "runs/create", create).status_code == 200


def test_a_new_private_experiment_is_refused_by_every_worker_as_soon_as_it_is_made(
    stack: RunningStack,
) -> None:
    """Each tracking worker caches the private experiments. bob keeps every worker's cache
    fresh with reads while carol creates private experiments; his first reads of each, spread
    over all workers, must be refused (a cache only re-read every few seconds served them)."""
    carol = _user(stack, "carol", "editor")
    bob = _user(stack, "bob", "editor")
    leaked = []
    for attempt in range(6):
        for _ in range(2 * stack.settings.workers):  # every worker reads the list now
            stack.get("/api/2.0/mlflow/experiments/search?max_results=1", auth=bob)
        experiment_id = _post(stack, carol, "experiments/create", {
            "name": f"fresh-{attempt}-{carol[0]}",
            "tags": [{"key": "trackgate.private", "value": "true"}]}).json()["experiment_id"]
        for _ in range(2 * stack.settings.workers):
            answer = stack.get(f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}",
                               auth=bob)
            if not _refused_by_policy(answer):
                leaked.append((experiment_id, answer.status_code, answer.text[:100]))
    assert not leaked


def test_a_grant_to_a_group_reaches_its_members_on_their_next_request(
    stack: RunningStack,
) -> None:
    """`trackgate.grant.group:NAME`: READ shows a private experiment, EDIT lets members log into
    it and MANAGE lets them move a model's alias; membership changes apply at once."""
    carol = _user(stack, "carol", "editor")
    bob = _user(stack, "bob", "editor")
    group = f"analysts-{carol[0]}"
    data_dir = ("--data-dir", str(stack.settings.data_dir))
    experiment_id = _post(stack, carol, "experiments/create", {
        "name": f"grouped-{carol[0]}", "tags": [{"key": "trackgate.private", "value": "true"}],
    }).json()["experiment_id"]
    run_id = _post(stack, carol, "runs/create",
                   {"experiment_id": experiment_id}).json()["run"]["info"]["run_id"]
    get = f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}"
    metric = {"run_id": run_id, "key": "m", "value": 1, "timestamp": 0}

    def grant(level: str) -> None:
        assert _post(stack, carol, "experiments/set-experiment-tag", {
            "experiment_id": experiment_id, "key": f"trackgate.grant.group:{group}",
            "value": level}).status_code == 200

    def groups(*args: str) -> None:
        result = trackgate("groups", *args, *data_dir)
        assert result.returncode == 0, result.stderr

    assert _refused_by_policy(stack.get(get, auth=bob))
    grant("READ")
    assert _refused_by_policy(stack.get(get, auth=bob))  # not a member yet
    # only the gateway vouches for groups: a client's own copy of the header is dropped
    forged = stack.get(get, auth=bob, headers={"X-Trackgate-Groups": group})
    assert _refused_by_policy(forged)
    groups("add", group, bob[0])
    assert f"{group}  {bob[0]}" in trackgate("groups", "list", *data_dir).stdout.splitlines()
    assert stack.get(get, auth=bob).status_code == 200
    assert _refused_by_policy(_post(stack, bob, "runs/create", {"experiment_id": experiment_id}))
    assert _refused_by_policy(_post(stack, bob, "runs/log-metric", metric))
    groups("remove", group, bob[0])
    assert _refused_by_policy(stack.get(get, auth=bob))  # the next request

    groups("add", group, bob[0])
    grant("EDIT")
    assert _post(stack, bob, "runs/create", {"experiment_id": experiment_id}).status_code == 200
    assert _post(stack, bob, "runs/log-metric", metric).status_code == 200
    # EDIT is not MANAGE; the refusal tells how a group would be granted it
    answer = _post(stack, bob, "experiments/update",
                   {"experiment_id": experiment_id, "new_name": f"bobs-{carol[0]}"})
    assert _refused_by_policy(answer) and "trackgate.grant.group:" in answer.json()["message"]

    model = f"grouped-model-{carol[0]}"
    _post(stack, carol, "registered-models/create", {"name": model})
    _post(stack, carol, "model-versions/create", {"name": model, "run_id": run_id,
                                                  "source": f"runs:/{run_id}/model"})
    alias = {"name": model, "alias": "champion", "version": "1"}
    assert _refused_by_policy(_post(stack, bob, "registered-models/alias", alias))
    assert _post(stack, carol, "registered-models/set-tag", {
        "name": model, "key": f"trackgate.grant.group:{group}", "value": "MANAGE"},
    ).status_code == 200
    assert _post(stack, bob, "registered-models/alias", alias).status_code == 200


# --- things that live in experiments: traces, assessments, datasets, scorers, review queues ---


def _v3(stack: RunningStack, auth: tuple[str, str], path: str, body: dict[str, Any] | None = None,
        method: str = "POST") -> requests.Response:
    return stack.request(method, f"/api/3.0/mlflow/{path}", auth=auth, json=body)


def _start_trace(stack: RunningStack, auth: tuple[str, str], experiment_id: str) -> str:
    """A trace as the MLflow client starts one (v3), with a client-chosen tag."""
    import secrets

    trace_id = f"tr-{secrets.token_hex(16)}"
    answer = _v3(stack, auth, "traces", {"trace": {"trace_info": {
        "trace_id": trace_id, "request_time": "2026-12-01T00:00:00Z", "state": "OK",
        "trace_location": {"type": "MLFLOW_EXPERIMENT",
                           "mlflow_experiment": {"experiment_id": experiment_id}},
        "tags": {"team": "carol", "trackgate.author": "admin"}}}})
    assert answer.status_code == 200, answer.text
    return trace_id


def _judge(name: str) -> str:
    from mlflow.genai.judges import make_judge

    judge = make_judge(name=name, instructions="Is {{ outputs }} polite?",
                       model="openai:/gpt-4o-mini", feedback_value_type=bool)
    return json.dumps(judge.model_dump())


def test_bob_cannot_change_carols_traces_assessments_datasets_scorers_or_review_queues(
    stack: RunningStack,
) -> None:
    """Items in an experiment follow the experiment: written by its owner, an EDIT grantee, an
    admin, or the item's own (server-recorded) author -- nobody else."""
    carol = _user(stack, "carol", "editor")
    bob = _user(stack, "bob", "editor")
    experiment_id = _post(stack, carol, "experiments/create",
                          {"name": f"genai-{carol[0]}"}).json()["experiment_id"]
    trace_id = _start_trace(stack, carol, experiment_id)
    assessment = _v3(stack, carol, f"traces/{trace_id}/assessments", {"assessment": {
        "assessment_name": "quality", "trace_id": trace_id, "feedback": {"value": True},
        "source": {"source_type": "HUMAN", "source_id": "admin"}}})
    assert assessment.status_code == 200, assessment.text
    assert assessment.json()["assessment"]["source"]["source_id"] == carol[0]  # stamped
    assessment_id = assessment.json()["assessment"]["assessment_id"]
    dataset = _v3(stack, carol, "datasets/create", {
        "name": f"golden-{carol[0]}", "experiment_ids": [experiment_id],
        "tags": json.dumps({"mlflow.user": "admin"})})
    assert dataset.status_code == 200, dataset.text
    dataset_id = dataset.json()["dataset"]["dataset_id"]
    assert dataset.json()["dataset"]["created_by"] == carol[0]  # stamped, not the client's
    records = json.dumps([{"inputs": {"q": "2+2"}, "expectations": {"a": "4"},
                           "tags": {"mlflow.user": "admin"}}])
    assert _v3(stack, carol, f"datasets/{dataset_id}/records",
               {"records": records}).status_code == 200
    scorer = {"experiment_id": experiment_id, "name": "carols_judge",
              "serialized_scorer": _judge("carols_judge")}
    assert _v3(stack, carol, "scorers/register", scorer).status_code == 200
    schema = _v3(stack, carol, "label-schemas/create", {
        "experiment_id": experiment_id, "name": "tone", "type": "FEEDBACK",
        "input": {"categorical": {"options": ["good", "bad"]}}})
    assert schema.status_code == 200, schema.text
    schema_id = schema.json()["label_schema"]["schema_id"]
    queue = _v3(stack, carol, "review-queues/create", {
        "experiment_id": experiment_id, "name": "carols-queue", "queue_type": "CUSTOM",
        "users": [carol[0]]})
    assert queue.status_code == 200, queue.text
    queue_id = queue.json()["review_queue"]["queue_id"]
    assert queue.json()["review_queue"]["created_by"] == carol[0]
    assert _v3(stack, carol, "review-queues/items/add",
               {"queue_id": queue_id, "item_ids": [trace_id]}).status_code == 200
    issue = _v3(stack, carol, "issues", {"experiment_id": experiment_id, "name": "rude",
                                         "description": "rude answers"})
    assert issue.status_code == 200, issue.text
    issue_id = issue.json()["issue"]["issue_id"]

    bobs_experiment = _post(stack, bob, "experiments/create",
                            {"name": f"bobs-{bob[0]}"}).json()["experiment_id"]
    bobs_run = _post(stack, bob, "runs/create", {"experiment_id": bobs_experiment}).json()[
        "run"]["info"]["run_id"]
    attacks = {
        "end trace v2": stack.request("PATCH", f"/api/2.0/mlflow/traces/{trace_id}", auth=bob,
                                      json={"timestamp_ms": 1, "status": "ERROR"}),
        "link trace to own run": _post(stack, bob, "traces/link-to-run",
                                       {"run_id": bobs_run, "trace_ids": [trace_id]}),
        "invoke scorer": stack.request("POST", "/ajax-api/3.0/mlflow/scorer/invoke", auth=bob,
                                       json={**scorer, "trace_ids": [trace_id]}),
        "evaluate": stack.request("POST", "/ajax-api/3.0/mlflow/genai/evaluate/invoke",
                                  auth=bob, json={"experiment_id": experiment_id,
                                                  "trace_ids": [trace_id],
                                                  "serialized_scorers": [_judge("j")]}),
        "set trace tag": _v3(stack, bob, f"traces/{trace_id}/tags", {"key": "team",
                                                                     "value": "bob"}, "PATCH"),
        "set trace tag v2": stack.request("PATCH", f"/api/2.0/mlflow/traces/{trace_id}/tags",
                                          auth=bob, json={"key": "team", "value": "bob"}),
        "delete trace tag": _v3(stack, bob, f"traces/{trace_id}/tags", {"key": "team"},
                                "DELETE"),
        "link prompts": _post(stack, bob, "traces/link-prompts", {
            "trace_id": trace_id, "prompt_versions": [{"name": "p", "version": "1"}]}),
        "create assessment": _v3(stack, bob, f"traces/{trace_id}/assessments", {"assessment": {
            "assessment_name": "quality", "trace_id": trace_id, "feedback": {"value": False},
            "source": {"source_type": "HUMAN", "source_id": bob[0]}}}),
        "update assessment": _v3(stack, bob, f"traces/{trace_id}/assessments/{assessment_id}", {
            "assessment": {"feedback": {"value": False}},
            "update_mask": "feedback"}, "PATCH"),
        "delete assessment": _v3(stack, bob, f"traces/{trace_id}/assessments/{assessment_id}",
                                 None, "DELETE"),
        "delete dataset": _v3(stack, bob, f"datasets/{dataset_id}", None, "DELETE"),
        "set dataset tags": _v3(stack, bob, f"datasets/{dataset_id}/tags",
                                {"tags": json.dumps({"stage": "bob"})}, "PATCH"),
        "delete dataset tag": _v3(stack, bob, f"datasets/{dataset_id}/tags/mlflow.user", None,
                                  "DELETE"),
        "upsert records": _v3(stack, bob, f"datasets/{dataset_id}/records", {
            "records": json.dumps([{"inputs": {"q": "2+2"}, "expectations": {"a": "5"}}])}),
        "delete records": _v3(stack, bob, f"datasets/{dataset_id}/records",
                              {"dataset_record_ids": ["x"]}, "DELETE"),
        "unlink dataset": _v3(stack, bob, f"datasets/{dataset_id}/remove-experiments",
                              {"experiment_ids": [experiment_id]}),
        "overwrite scorer": _v3(stack, bob, "scorers/register", {
            **scorer, "serialized_scorer": _judge("carols_judge")}),
        "delete scorer": _v3(stack, bob, "scorers/delete", {"experiment_id": experiment_id,
                                                            "name": "carols_judge"}, "DELETE"),
        "create label schema": _v3(stack, bob, "label-schemas/create", {
            "experiment_id": experiment_id, "name": "bobs", "type": "FEEDBACK",
            "input": {"text": {}}}),
        "update label schema": _v3(stack, bob, "label-schemas/update",
                                   {"schema_id": schema_id, "name": "bobs"}, "PATCH"),
        "delete label schema": _v3(stack, bob, "label-schemas/delete", {"schema_id": schema_id},
                                   "DELETE"),
        "create queue": _v3(stack, bob, "review-queues/create", {
            "experiment_id": experiment_id, "name": "bobs-queue", "queue_type": "CUSTOM"}),
        "user queue": _v3(stack, bob, "review-queues/get-or-create-user",
                          {"experiment_id": experiment_id, "user": bob[0]}),
        "take queue": _v3(stack, bob, "review-queues/update",
                          {"queue_id": queue_id, "new_owner": bob[0]}),
        "delete queue": _v3(stack, bob, "review-queues/delete", {"queue_id": queue_id}),
        "remove items": _v3(stack, bob, "review-queues/items/remove",
                            {"queue_id": queue_id, "item_ids": [trace_id]}),
        "set item status": _v3(stack, bob, "review-queues/items/set-status",
                               {"queue_id": queue_id, "item_id": trace_id,
                                "status": "COMPLETED"}),
        "update issue": _v3(stack, bob, f"issues/{issue_id}",
                            {"issue_id": issue_id, "name": "bobs"}, "PATCH"),
        "optimize prompts": _v3(stack, bob, "prompt-optimization/jobs", {
            "experiment_id": experiment_id, "source_prompt_uri": "prompts:/p/1"}),
        # a trace's spans are a file in the artifact store, beside the experiment's other files
        "overwrite spans": stack.request(
            "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/traces/{trace_id}/"
            "artifacts/traces.json", auth=bob, data=b'{"spans": []}'),
        "experiment file": stack.request(
            "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/bob.txt", auth=bob,
            data=b"bob was here"),
    }
    wrong = {what: (a.status_code, a.text[:200]) for what, a in attacks.items()
             if not _refused_by_policy(a)}
    assert not wrong, wrong
    message = attacks["delete assessment"].json()["message"]
    assert f"its author {carol[0]!r}" in message and f"experiment {experiment_id}" in message

    # nothing of carol's changed
    trace = _v3(stack, carol, f"traces/{trace_id}", None, "GET").json()["trace"]["trace_info"]
    assert trace["tags"]["team"] == "carol"
    assert trace["tags"]["trackgate.author"] == carol[0]  # the server's, not the client's
    kept = _v3(stack, carol, f"traces/{trace_id}/assessments/{assessment_id}", None, "GET")
    assert kept.json()["assessment"]["feedback"]["value"] is True
    got = json.loads(_v3(stack, carol, f"datasets/{dataset_id}/records", None,
                         "GET").json()["records"])
    assert [r["expectations"] for r in got] == [{"a": "4"}]
    assert [r["created_by"] for r in got] == [carol[0]]  # stamped, not the client's
    assert _v3(stack, carol, f"review-queues/get?queue_id={queue_id}", None, "GET").json()[
        "review_queue"]["created_by"] == carol[0]

    # bob's own trace in carol's experiment is his to tag, but its author tag is the server's
    bobs_trace = _start_trace(stack, bob, experiment_id)
    assert _v3(stack, bob, f"traces/{bobs_trace}/tags", {"key": "team", "value": "bob"},
               "PATCH").status_code == 200
    assert stack.request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/traces/"
                         f"{bobs_trace}/artifacts/traces.json", auth=bob,
                         data=b'{"spans": []}').status_code == 200
    assert _refused_by_policy(_v3(stack, bob, f"traces/{bobs_trace}/tags",
                                  {"key": "trackgate.author", "value": carol[0]}, "PATCH"))
    v2 = _post(stack, bob, "traces", {"experiment_id": experiment_id, "timestamp_ms": 1,
                                       "tags": [{"key": "trackgate.author", "value": carol[0]}]})
    assert v2.status_code == 200, v2.text
    assert {"key": "trackgate.author", "value": bob[0]} in v2.json()["trace_info"]["tags"]
    # carol owns the experiment: bob's trace in it is hers to tag too
    assert _v3(stack, carol, f"traces/{bobs_trace}/tags", {"key": "team", "value": "carol"},
               "PATCH").status_code == 200
    # a grant of EDIT on the experiment lets bob write its items
    assert _post(stack, carol, "experiments/set-experiment-tag", {
        "experiment_id": experiment_id, "key": f"trackgate.grant.{bob[0]}",
        "value": "EDIT"}).status_code == 200
    assert _v3(stack, bob, f"traces/{trace_id}/tags", {"key": "team", "value": "bob"},
               "PATCH").status_code == 200
    assert _v3(stack, bob, f"datasets/{dataset_id}/tags",
               {"tags": json.dumps({"stage": "bob"})}, "PATCH").status_code == 200
    assert _v3(stack, bob, "scorers/delete", {"experiment_id": experiment_id,
                                              "name": "carols_judge"}, "DELETE").status_code == 200


def test_model_versions_and_datasets_of_a_private_experiment_are_as_private_as_its_runs(
    stack: RunningStack,
) -> None:
    """carol's public registered model has a version made from a run of her private experiment:
    bob (no READ) does not get it, its files, its download location or its alias, and lists
    leave it out; the version made from a public run stays visible. The experiment's evaluation
    datasets and review queues are hidden the same way. READ shows them."""
    carol = _user(stack, "carol", "editor")
    bob = _user(stack, "bob", "editor")
    private_id = _post(stack, carol, "experiments/create", {
        "name": f"secret-{carol[0]}", "tags": [{"key": "trackgate.private", "value": "true"}],
    }).json()["experiment_id"]
    public_id = _post(stack, carol, "experiments/create",
                      {"name": f"open-{carol[0]}"}).json()["experiment_id"]
    runs = {}
    for where, experiment_id in (("public", public_id), ("private", private_id)):
        runs[where] = _post(stack, carol, "runs/create", {"experiment_id": experiment_id}
                            ).json()["run"]["info"]["run_id"]
        stack.request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/"
                      f"{runs[where]}/artifacts/model/MLmodel", auth=carol,
                      data=b"artifact_path: model\nflavors: {}\n").raise_for_status()
    model = f"mixed-{carol[0]}"
    assert _post(stack, carol, "registered-models/create", {"name": model}).status_code == 200
    logged_id = _post(stack, carol, "logged-models", {"experiment_id": private_id,
                                                      "name": "secret"}).json()["model"]["info"][
        "model_id"]
    # version 1 from the public run; 2 from the private run; 3 from a logged model of the
    # private experiment (no run)
    for source, extra in ((f"runs:/{runs['public']}/model", {"run_id": runs["public"]}),
                          (f"runs:/{runs['private']}/model", {"run_id": runs["private"]}),
                          (f"models:/{logged_id}", {"model_id": logged_id})):
        body = {"name": model, "source": source, **extra}
        made = _post(stack, carol, "model-versions/create", body)
        assert made.status_code == 200, made.text
    assert _post(stack, carol, "registered-models/alias",
                 {"name": model, "alias": "champion", "version": "2"}).status_code == 200

    where = quote(f"name = '{model}'")

    dataset_id = _v3(stack, carol, "datasets/create", {
        "name": f"secret-set-{carol[0]}", "experiment_ids": [private_id]}).json()["dataset"][
        "dataset_id"]
    queue_id = _v3(stack, carol, "review-queues/create", {
        "experiment_id": private_id, "name": "secret-queue", "queue_type": "CUSTOM"}).json()[
        "review_queue"]["queue_id"]

    def evaluation_data(who: tuple[str, str]) -> list[requests.Response]:
        return [_v3(stack, who, f"datasets/{dataset_id}", None, "GET"),
                _v3(stack, who, f"datasets/{dataset_id}/records", None, "GET"),
                stack.get(f"/api/3.0/mlflow/review-queues/get?queue_id={queue_id}", auth=who)]

    def datasets_listed(who: tuple[str, str]) -> bool:
        found = _v3(stack, who, "datasets/search", {"max_results": 1000}).json()
        return dataset_id in {d["dataset_id"] for d in found.get("datasets", [])}

    def listed(who: tuple[str, str]) -> set[str]:
        found = stack.get(f"/api/2.0/mlflow/model-versions/search?filter={where}",
                          auth=who).json().get("model_versions", [])
        return {v["version"] for v in found}

    def named(who: tuple[str, str], version: str) -> list[requests.Response]:
        return [
            stack.get(f"/api/2.0/mlflow/model-versions/get?name={model}&version={version}",
                      auth=who),
            stack.get(f"/api/2.0/mlflow/model-versions/get-download-uri?name={model}"
                      f"&version={version}", auth=who),
            stack.get(f"/model-versions/get-artifact?name={model}"
                      f"&version={version}&path=MLmodel", auth=who),
        ]

    assert listed(bob) == {"1"}
    assert listed(carol) == {"1", "2", "3"}
    assert listed(("admin", stack.admin_password)) == {"1", "2", "3"}
    for version in ("2", "3"):
        answers = named(bob, version)
        assert all(_refused_by_policy(a) and "private" in a.text for a in answers), \
            [(a.status_code, a.text[:150]) for a in answers]
    # (MLflow itself cannot serve a version's files from mlflow-artifacts: its own 500)
    assert [a.status_code for a in named(bob, "1")][:2] == [200, 200]
    assert not any(_refused_by_policy(a) for a in named(bob, "1"))
    assert _refused_by_policy(stack.get(
        f"/api/2.0/mlflow/registered-models/alias?name={model}&alias=champion", auth=bob))
    # the registered model itself stays visible, without the private versions
    got = stack.get(f"/api/2.0/mlflow/registered-models/get?name={model}", auth=bob).json()
    assert [v["version"] for v in got["registered_model"].get("latest_versions", [])] == []
    searched = stack.get(f"/api/2.0/mlflow/registered-models/search?filter={where}",
                         auth=bob).json()["registered_models"]
    assert len(searched) == 1 and not searched[0].get("latest_versions")
    assert _post(stack, bob, "registered-models/get-latest-versions",
                 {"name": model}).json().get("model_versions", []) == []
    graphql = stack.request("POST", "/graphql", auth=bob, json={
        "query": "query q($f: String) { mlflowSearchModelVersions(input: {filter: $f}) "
                 "{ modelVersions { version runId source } } }",
        "variables": {"f": f"name = '{model}'"}})
    assert graphql.status_code == 200, graphql.text
    versions = graphql.json()["data"]["mlflowSearchModelVersions"]["modelVersions"]
    assert [v["version"] for v in versions] == ["1"]
    assert all(_refused_by_policy(a) for a in evaluation_data(bob)), \
        [(a.status_code, a.text[:150]) for a in evaluation_data(bob)]
    assert datasets_listed(carol) and not datasets_listed(bob)

    _post(stack, carol, "experiments/set-experiment-tag", {
        "experiment_id": private_id, "key": f"trackgate.grant.{bob[0]}", "value": "READ"})
    assert listed(bob) == {"1", "2", "3"}
    assert [a.status_code for a in named(bob, "2")][:2] == [200, 200]
    assert [a.status_code for a in evaluation_data(bob)] == [200, 200, 200]
    assert datasets_listed(bob)


# --- server-stamped authors and the audit log -------------------------------------------------


CLIENT_SCRIPT = """
import json, mlflow, requests
from mlflow.tracking import MlflowClient
mlflow.set_experiment("stamped")
with mlflow.start_run(tags={"mlflow.user": "mallory"}) as run:
    mlflow.log_metric("m", 1.0)
    mlflow.set_tag("mlflow.user", "mallory")
client = MlflowClient()
exp = mlflow.get_experiment_by_name("stamped").experiment_id
other = client.create_run(exp, tags={"mlflow.user": "mallory"})

@mlflow.trace
def traced(x):
    return x

traced(1)
print(json.dumps([mlflow.get_last_active_trace_id(), run.info.run_id, other.info.run_id]))
"""


def test_runs_are_stamped_with_the_verified_user_whatever_the_client_says(
    stack: RunningStack,
) -> None:
    bob = _user(stack, "bob", "editor")
    env = {**stack.client_env(*bob), "LOGNAME": "mallory", "USER": "mallory"}
    result = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT], capture_output=True,
                            text=True, timeout=300, env=clean_env(**env))
    assert result.returncode == 0, result.stderr[-3000:]
    trace_id, *run_ids = json.loads(result.stdout.strip().splitlines()[-1])
    # a trace records its author too
    trace = stack.get(f"/api/3.0/mlflow/traces/{trace_id}", auth=bob).json()["trace"]
    assert trace["trace_info"]["tags"]["trackgate.author"] == bob[0], trace
    # a raw request that names another user in the body
    experiment = stack.get("/api/2.0/mlflow/experiments/get-by-name?experiment_name=stamped",
                           auth=bob).json()["experiment"]
    raw = _post(stack, bob, "runs/create", {
        "experiment_id": experiment["experiment_id"], "user_id": "admin", "userId": "admin",
        "tags": [{"key": "mlflow.user", "value": "admin"}],
    })
    assert raw.status_code == 200, raw.text
    run_ids.append(raw.json()["run"]["info"]["run_id"])
    for run_id in run_ids:
        run = stack.get(f"/api/2.0/mlflow/runs/get?run_id={run_id}", auth=bob).json()["run"]
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        assert run["info"]["user_id"] == bob[0], run
        assert tags["mlflow.user"] == bob[0], tags
    assert {"key": "trackgate.owner", "value": bob[0]} in experiment["tags"]
    # nobody removes the stamp
    answer = _post(stack, bob, "runs/delete-tag", {"run_id": run_ids[0], "key": "mlflow.user"})
    assert _refused_by_policy(answer) or answer.status_code == 403

    # the audit log has the lines, and `trackgate audit --user` finds them
    lines = [json.loads(line) for line in
             (stack.settings.logs / "audit.log").read_text().splitlines()]  # type: ignore[operator]
    created = [e for e in lines if e.get("user") == bob[0] and e.get("action") == "create_run"]
    assert len(created) >= 3
    for event in created:
        assert event["status"] == 200 and event["role"] == "editor"
        assert event["method"] == "POST" and event["path"].endswith("/runs/create")
        assert event["client_ip"].startswith("127.") and re.fullmatch(r"[0-9a-f]{32}",
                                                                      event["request_id"])
        assert event["experiment_id"] == experiment["experiment_id"]
    assert any(e.get("event") == "login" and e.get("user") == bob[0] and e["status"] == 204
               for e in lines)
    found = trackgate("audit", "--user", bob[0], "--action", "create_run", "--since", "1h",
                      "--data-dir", str(stack.settings.data_dir))
    assert found.returncode == 0, found.stderr
    assert len(found.stdout.splitlines()) == len(created)
    assert all(bob[0] in line and "create_run" in line for line in found.stdout.splitlines())


def test_failed_logins_are_audited(stack: RunningStack) -> None:
    name, _ = stack.new_user("forgetful")
    assert stack.get("/api/2.0/mlflow/experiments/search?max_results=1",
                     auth=(name, "wrong")).status_code == 401
    found = trackgate("audit", "--user", name, "--action", "login_failed", "--json",
                      "--data-dir", str(stack.settings.data_dir))
    events = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(events) == 1 and events[0]["status"] == 401
    assert events[0]["path"].startswith("/api/2.0/mlflow/experiments/search")


# --- a viewer in Chromium ----------------------------------------------------------------------


def test_a_viewer_browses_the_ui_without_error_and_a_write_gets_the_clear_403(
    stack: RunningStack,
) -> None:
    from ..browser import chromium, log_in

    admin = ("admin", stack.admin_password)
    name = f"viewed-{secrets_token()}"
    experiment_id = _post(stack, admin, "experiments/create", {"name": name}).json()[
        "experiment_id"]
    run = _post(stack, admin, "runs/create", {"experiment_id": experiment_id,
                                              "run_name": "viewed-run"}).json()["run"]["info"]
    _post(stack, admin, "runs/log-metric", {"run_id": run["run_id"], "key": "loss",
                                            "value": 0.5, "timestamp": 0, "step": 0})
    stack.request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run['run_id']}"
                  "/artifacts/model/MLmodel", auth=admin,
                  data=b"artifact_path: model\nflavors: {}\n").raise_for_status()
    model = f"viewed-model-{secrets_token()}"
    _post(stack, admin, "registered-models/create", {"name": model})
    source = f"mlflow-artifacts:/{experiment_id}/{run['run_id']}/artifacts/model"
    _post(stack, admin, "model-versions/create", {"name": model, "run_id": run["run_id"],
                                                  "source": source})
    viewer = _user(stack, "viewer-ui", "viewer")

    with chromium() as browser:
        context: Any = browser.new_context(  # type: ignore[attr-defined]
            ignore_https_errors=True,
            viewport={"width": 1400, "height": 800},
        )
        page = log_in(context, stack.url, viewer[0], viewer[1])
        failed: list[str] = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.request.method} {r.url}")
                if r.status >= 400 else None)
        page.goto(stack.url + "/#/experiments", timeout=120_000)
        page.get_by_text(name).first.wait_for(timeout=120_000)
        page.goto(f"{stack.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        page.get_by_text("viewed-run").first.wait_for(timeout=120_000)
        page.get_by_text("viewed-run").first.click()
        page.wait_for_url("**/runs/**", timeout=120_000)
        page.wait_for_timeout(2000)
        page.goto(f"{stack.url}/#/experiments/{experiment_id}/traces")
        page.wait_for_timeout(2000)
        page.goto(f"{stack.url}/#/models")
        page.get_by_text(model).first.wait_for(timeout=120_000)
        page.goto(f"{stack.url}/#/models/{model}/versions/1")
        page.get_by_text("Version 1").first.wait_for(timeout=120_000)
        page.wait_for_timeout(2000)
        # MLflow itself 404s a few optional endpoints; nothing may be refused or fail.
        assert not [f for f in failed if f.startswith(("401", "403", "429", "5"))], failed

        # A write from the page, as the UI's own "Create experiment" sends it.
        answer = page.evaluate(
            """async () => {
                const r = await fetch('/ajax-api/2.0/mlflow/experiments/create', {
                    method: 'POST', headers: {'Content-Type': 'application/json'},
                    body: JSON.stringify({name: 'viewer-was-here'})});
                return {status: r.status, body: await r.json()};
            }"""
        )
        assert answer["status"] == 403, answer
        assert answer["body"]["error_code"] == "PERMISSION_DENIED"
        assert f"'{viewer[0]}' has the role 'viewer'" in answer["body"]["message"]
        assert "create_experiment" in answer["body"]["message"]
    search = _post(stack, admin, "experiments/search", {"filter": "name = 'viewer-was-here'",
                                                        "max_results": 5})
    assert not search.json().get("experiments")


def secrets_token() -> str:
    import secrets

    return secrets.token_hex(3)


# --- ids spelled so the checks and MLflow would read different things ------------------------


@pytest.fixture(scope="module")
def carols_secret(stack: RunningStack) -> dict[str, Any]:
    """carol's private experiment with a run and its artifact, a public run of hers with an
    artifact, and bob, an editor with no grant."""
    carol = _user(stack, "carol", "editor")
    bob = _user(stack, "bob", "editor")
    private_id = _post(stack, carol, "experiments/create", {
        "name": f"spelled-{carol[0]}", "tags": [{"key": "trackgate.private", "value": "true"}],
    }).json()["experiment_id"]
    public_id = _post(stack, carol, "experiments/create",
                      {"name": f"spelled-open-{carol[0]}"}).json()["experiment_id"]
    runs = {}
    for where, experiment_id in (("private", private_id), ("public", public_id)):
        run_id = _post(stack, carol, "runs/create", {"experiment_id": experiment_id}).json()[
            "run"]["info"]["run_id"]
        stack.request("PUT", f"{ARTIFACTS}/{experiment_id}/{run_id}/artifacts/model.pkl",
                      auth=carol, data=b"carol's model").raise_for_status()
        runs[where] = run_id
    return {"carol": carol, "bob": bob, "private": private_id, "public": public_id, "runs": runs}


ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


def _escaped(text: str) -> str:
    """TEXT percent-encoded twice over: MLflow decodes it back, nginx and Flask only once."""
    return "".join(f"%25{ord(c):02x}" for c in text)


def test_an_artifact_path_encoded_twice_neither_reads_nor_overwrites_nor_deletes_carols_files(
        stack: RunningStack, carols_secret: dict[str, Any]) -> None:
    """MLflow decodes percent-escapes in artifact paths up to ten times: `%2535` reaches it as
    `%35` and becomes `5`. bob spells carol's experiment and run ids that way (or hides a `.`
    segment) to read her private model, overwrite her models with his pickle, or delete them."""
    c = carols_secret
    bob, carol = c["bob"], c["carol"]
    for where in ("private", "public"):
        experiment_id, run_id = c[where], c["runs"][where]
        spellings = [
            f"{_escaped(experiment_id)}/{_escaped(run_id[:2])}{run_id[2:]}/artifacts/model.pkl",
            f"{experiment_id}/%252e/{run_id}/artifacts/model.pkl",
        ]
        for path in spellings:
            url = f"{ARTIFACTS}/{path}"
            answers = [stack.request("PUT", url, auth=bob, data=b"bob's pickle"),
                       stack.request("DELETE", url, auth=bob)]
            if where == "private":  # the public run's files are everyone's to read
                answers.append(stack.get(url, auth=bob))
            assert all(a.status_code in (400, 403, 404) for a in answers), \
                [(path, a.status_code, a.text[:100]) for a in answers]
            assert not any(b"carol's model" in a.content for a in answers)
        kept = stack.get(f"{ARTIFACTS}/{experiment_id}/{run_id}/artifacts/model.pkl", auth=carol)
        assert kept.content == b"carol's model"
    listed = stack.get(f"/api/2.0/mlflow/artifacts/list?run_id={c['runs']['public']}"
                       f"&path={_escaped('x')}", auth=bob)
    assert listed.status_code == 400 and "not plain" in listed.text


def test_a_get_with_a_json_body_is_refused_not_read_past_the_checks(
        stack: RunningStack, carols_secret: dict[str, Any]) -> None:
    """MLflow reads a GET's JSON body when it has no query string; the checks read the query."""
    c = carols_secret
    run_id = c["runs"]["private"]
    for path, body in (("runs/get", {"run_id": run_id}),
                       ("experiments/get", {"experiment_id": c["private"]}),
                       ("metrics/get-history", {"run_id": run_id, "metric_key": "m"})):
        answer = stack.request("GET", f"/api/2.0/mlflow/{path}", auth=c["bob"],
                               data=json.dumps(body), headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and "carries no body" in answer.text, \
            (path, answer.status_code, answer.text[:200])
    assert stack.get(f"/api/2.0/mlflow/runs/get?run_id={run_id}", auth=c["carol"]).ok


def test_other_spellings_of_a_private_experiments_id_are_refused(
        stack: RunningStack, carols_secret: dict[str, Any]) -> None:
    """MLflow reads int(id): "05", " 5", "+5" and Arabic-Indic digits all name experiment 5."""
    c = carols_secret
    bob, private_id = c["bob"], c["private"]
    arabic = "".join(chr(0x0660 + int(d)) for d in private_id)
    for spelled in (f"0{private_id}", f" {private_id}", f"+{private_id}", arabic):
        answers = [
            _post(stack, bob, "runs/search", {"experiment_ids": [spelled]}),
            _post(stack, bob, "runs/create", {"experiment_id": spelled}),
            stack.get("/api/2.0/mlflow/experiments/get", auth=bob,
                      params={"experiment_id": spelled}),
        ]
        assert all(a.status_code in (400, 403) for a in answers), \
            [(spelled, a.status_code, a.text[:120]) for a in answers]
        assert not any(c["runs"]["private"] in a.text for a in answers)


def test_graphql_naming_a_private_experiment_inline_nested_or_by_variable_is_refused(
        stack: RunningStack, carols_secret: dict[str, Any]) -> None:
    c = carols_secret
    bob, private_id = c["bob"], c["private"]
    requests_ = [
        {"query": f'query {{ mlflowGetExperiment(input: {{experimentId: "{private_id}"}}) '
                  "{ experiment { name } } }"},
        {"query": "query q($id: String!) { mlflowGetExperiment(input: {experimentId: $id}) "
                  "{ experiment { name } } }", "variables": {"id": private_id}},
        {"query": f'mutation {{ mlflowSearchRuns(input: {{experimentIds: ["{private_id}"]}}) '
                  "{ runs { info { runId } } } }"},
        {"query": "mutation m($input: MlflowSearchRunsInput) { mlflowSearchRuns(input: $input) "
                  "{ runs { info { runId } } } }",
         "variables": {"input": {"experimentIds": [private_id]}}},
    ]
    for body in requests_:
        answer = stack.request("POST", "/graphql", auth=bob, json=body)
        assert _refused_by_policy(answer) and "private" in answer.text, \
            (body["query"][:60], answer.status_code, answer.text[:200])
        assert c["runs"]["private"] not in answer.text
    assert "spelled-" in stack.request("POST", "/graphql", auth=c["carol"],
                                       json=requests_[1]).text


def test_an_mlflow2_trace_of_a_private_experiment_is_refused_by_its_plain_hex_id(
        stack: RunningStack, carols_secret: dict[str, Any]) -> None:
    """MLflow 2 clients start traces with the v2 API, whose ids are plain hex like run ids."""
    c = carols_secret
    started = _post(stack, c["carol"], "traces", {
        "experiment_id": c["private"], "timestamp_ms": 1, "request_metadata": [], "tags": []})
    assert started.status_code == 200, started.text
    request_id = started.json()["trace_info"]["request_id"]
    for path in (f"/api/2.0/mlflow/traces/{request_id}/info",
                 f"/ajax-api/2.0/mlflow/get-trace-artifact?request_id={request_id}"):
        answer = stack.get(path, auth=c["bob"])
        assert _refused_by_policy(answer), (path, answer.status_code, answer.text[:200])
    assert stack.get(f"/api/2.0/mlflow/traces/{request_id}/info", auth=c["carol"]).ok
