"""The access layer when MLflow's store cannot answer (database locked, connection lost): the
request is refused with a 503 the client retries, never passed on as if the run, model or
experiment did not exist (MLflow's own answer a moment later could then be the private data).

A real MLflow SqlAlchemyStore on a sqlite file, made unreadable for the length of a request."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from trackgate.audit import AuditLog
from trackgate.server.access import Access, LookupFailed, Owners
from trackgate.server.policy import Policy
from werkzeug.test import Client

from .test_policy import Recorder


class StoreOwners(Owners):
    """Owners read from STORE instead of the server's global one."""

    def __init__(self, store: Any) -> None:
        super().__init__()
        self.store = store

    def _tracking(self) -> Any:
        return self.store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = tmp_path_factory.mktemp("store")
    db = root / "mlflow.db"
    return SqlAlchemyStore(f"sqlite:///{db}", str(root / "artifacts")), db


@contextmanager
def broken(store: Any, db: Path) -> Iterator[None]:
    """The database file unreadable for a moment (its header overwritten, the pool's open
    connections closed): every query fails at once, as with a lost connection. (A lock would
    do too, but MLflow waits 20 s on one.)"""
    store.engine.dispose()
    with open(db, "r+b") as f:
        header = f.read(16)
        f.seek(0)
        f.write(b"not a database!!")
    try:
        yield
    finally:
        with open(db, "r+b") as f:
            f.write(header)
        store.engine.dispose()  # connections opened meanwhile remember the bad header


def _private_run(store: Any, name: str) -> str:
    from mlflow.entities import ExperimentTag

    experiment_id = store.create_experiment(name, tags=[
        ExperimentTag("trackgate.private", "true"), ExperimentTag("trackgate.owner", "carol")])
    return store.create_run(experiment_id, "carol", 0, [], name).info.run_id


def _as_bob(client: Client, path: str) -> Any:
    return client.get(path, headers={"X-Trackgate-User": "bob", "X-Trackgate-Role": "editor"})


def test_a_failing_store_refuses_a_read_of_a_private_run_instead_of_passing_it(
        store: tuple[Any, Path]) -> None:
    mlflow_store, db = store
    known = _private_run(mlflow_store, "secret-a")
    recorder = Recorder()
    access = Access(AuditLog(None), owners=StoreOwners(mlflow_store))
    access.private.ttl = 3600.0  # read once, below: only the run lookup meets the failure
    from mlflow.server import app

    client = Client(Policy(recorder, url_map=app.url_map, access=access))
    assert _as_bob(client, f"/api/2.0/mlflow/runs/get?run_id={known}").status_code == 403
    fresh = _private_run(mlflow_store, "secret-b")  # not cached: its lookup needs the store
    access.private.changed()
    assert _as_bob(client, "/api/2.0/mlflow/runs/get?run_id=" + "0" * 32).status_code == 200
    with broken(mlflow_store, db):
        answer = _as_bob(client, f"/api/2.0/mlflow/runs/get?run_id={fresh}")
    assert answer.status_code == 503, answer.text
    assert answer.json["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert "try again" in answer.json["message"]
    assert [path for path, _ in recorder.calls] == ["/api/2.0/mlflow/runs/get"]  # the 404 one
    assert _as_bob(client, f"/api/2.0/mlflow/runs/get?run_id={fresh}").status_code == 403


def test_a_store_that_cannot_list_private_experiments_refuses_every_request(
        store: tuple[Any, Path]) -> None:
    mlflow_store, db = store
    recorder = Recorder()
    access = Access(AuditLog(None), owners=StoreOwners(mlflow_store))
    from mlflow.server import app

    client = Client(Policy(recorder, url_map=app.url_map, access=access))
    with broken(mlflow_store, db):
        answer = _as_bob(client, "/api/2.0/mlflow/experiments/search?max_results=5")
    assert answer.status_code == 503 and not recorder.calls


def test_ids_that_name_nothing_are_absent_and_a_failure_is_not(store: tuple[Any, Path]) -> None:
    mlflow_store, db = store
    owners = StoreOwners(mlflow_store)
    assert owners.run("f" * 32) == (False, None, "")
    assert owners.experiment("not-a-number") == (False, {})
    assert owners.logged_model("m-" + "0" * 32) == (False, None, "")
    with broken(mlflow_store, db), pytest.raises(LookupFailed, match="check access to run"):
        owners.run("e" * 32)
