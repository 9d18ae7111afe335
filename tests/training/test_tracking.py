"""The one MLflow run lifecycle: however a run ends, it gets the same status and failure tag."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from training.tracking import FAILURE_TAG, tracked_run


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """A local SQLite tracking store: the lifecycle is the client's, whatever server is behind it."""
    root = tmp_path_factory.mktemp("mlruns")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    client.create_experiment("lifecycle", artifact_location=(root / "artifacts").as_uri())
    return client


def _run(client) -> str:
    return client.create_run(client.get_experiment_by_name("lifecycle").experiment_id).info.run_id


def _ended(client, run_id):
    run = client.get_run(run_id)
    return run.info.status, run.data.tags.get(FAILURE_TAG)


def test_success_finishes(client):
    run_id = _run(client)
    with tracked_run(client, run_id):
        pass
    assert _ended(client, run_id) == ("FINISHED", None)


def test_an_exception_fails_the_run_with_its_reason(client):
    run_id = _run(client)
    with pytest.raises(ValueError), tracked_run(client, run_id):
        raise ValueError("data.train: no such folder")
    assert _ended(client, run_id) == ("FAILED", "ValueError: data.train: no such folder")


def test_ctrl_c_kills_the_run(client):
    run_id = _run(client)
    with pytest.raises(KeyboardInterrupt), tracked_run(client, run_id):
        raise KeyboardInterrupt
    assert _ended(client, run_id) == ("KILLED", "KeyboardInterrupt: ")


def test_a_tune_stop_is_not_a_failure(client):
    run_id = _run(client)
    with pytest.raises(SystemExit), tracked_run(client, run_id, stopped_status=lambda: "KILLED"):
        raise SystemExit(0)
    assert _ended(client, run_id) == ("KILLED", None)
    # without a stop handler, SystemExit is a failure like any other
    run_id = _run(client)
    with pytest.raises(SystemExit), tracked_run(client, run_id):
        raise SystemExit(1)
    assert _ended(client, run_id) == ("FAILED", "SystemExit: 1")
