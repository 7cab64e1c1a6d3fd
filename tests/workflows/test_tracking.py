"""Workflow 1: examples/train.py logs everything a training script logs, through the proxy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ..support import RunningStack
from .conftest import run_example, unique


@pytest.fixture(scope="module")
def sweep(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One run of examples/train.py (a parent run and two nested children)."""
    experiment = unique("tracking")
    result = run_example(stack, "train.py", "--experiment", experiment, "--alphas", "0.1,100",
                         cwd=tmp_path_factory.mktemp("train"))
    parent = re.search(r"parent run: (\w+)", result.stdout)
    best = re.search(r"best child: (\w+)", result.stdout)
    assert parent and best, result.stdout
    return {"experiment": experiment, "parent": parent.group(1), "best": best.group(1)}


def test_params_tags_and_artifact_files_and_directories_arrive(
        mlflow_client: MlflowClient, sweep: dict[str, str], tmp_path: Path) -> None:
    parent = mlflow_client.get_run(sweep["parent"])
    assert parent.data.params["alphas"] == "0.1,100"
    assert parent.data.tags["team"] == "examples"
    assert parent.data.tags["best_child"] == sweep["best"]

    top = {a.path: a for a in mlflow_client.list_artifacts(sweep["parent"])}
    assert not top["report.json"].is_dir and top["data"].is_dir
    assert sorted(a.path for a in mlflow_client.list_artifacts(sweep["parent"], "data")) == [
        "data/README.txt", "data/val_sample.csv"]
    report = mlflow_client.download_artifacts(sweep["parent"], "report.json", str(tmp_path))
    assert '"alphas": [0.1, 100.0]' in Path(report).read_text()
    assert parent.outputs.model_outputs, "the best model is logged with the parent run"


def test_nested_runs_carry_autolog_params_and_stepped_metrics(
        mlflow_client: MlflowClient, sweep: dict[str, str]) -> None:
    parent = mlflow_client.get_run(sweep["parent"])
    children = mlflow_client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep['parent']}'")
    assert {c.data.params["alpha"] for c in children} == {"0.1", "100.0"}  # logged by autolog
    for child in children:
        assert "training_r2_score" in child.data.metrics  # autolog's own metric next to ours
        history = sorted(mlflow_client.get_metric_history(child.info.run_id, "train_loss"),
                         key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1, 2, 3, 4]
        values = [m.value for m in history]
        assert values == sorted(values, reverse=True) and len(set(values)) == 5


def test_search_ranks_runs_by_metric_from_the_client(
        mlflow_client: MlflowClient, sweep: dict[str, str]) -> None:
    experiment = mlflow_client.get_experiment_by_name(sweep["experiment"])
    ordered = mlflow_client.search_runs(
        [experiment.experiment_id], "params.alpha != ''", order_by=["metrics.val_rmse ASC"])
    rmses = [r.data.metrics["val_rmse"] for r in ordered]
    assert len(rmses) == 2 and rmses == sorted(rmses)
    # alpha=100 over-regularises the diabetes data: it must rank last and not be the best child.
    assert ordered[-1].data.params["alpha"] == "100.0"
    assert ordered[0].info.run_id == sweep["best"]
