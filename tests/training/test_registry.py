"""Registry on the real MLflow server: registration with evidence, aliases that move, and their history."""

from __future__ import annotations

import time


import pytest
from helpers import sql_rows
from mlflow.tracking import MlflowClient

from maskrcnn.package import open_package
from training.registry import CHAMPION, alias_history, get_alias, register_package, set_alias
from training.tracking import log_package

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_versions(mlflow_stack, serving_package, tmp_path_factory):
    """Three runs, each logging a serving package (with its own metrics) and registering it."""
    client = MlflowClient(mlflow_stack.tracking_uri)
    name = f"registry-{time.time_ns()}"
    exp_id = client.create_experiment(name)
    tmp = tmp_path_factory.mktemp("registry")
    versions = []
    for i in range(3):
        run_id = client.create_run(exp_id).info.run_id
        package = open_package(serving_package).stamped({"metrics": {"segm_mAP": 0.1 * i, "mask_iou": 0.5},
                                                         "dataset_hash": "h", "mlflow_run_id": run_id,
                                                         "git_commit": "c" * 40})
        folder = package.save(tmp / f"package{i}")
        versions.append(register_package(client, name, log_package(client, run_id, folder), package))
    return client, name, versions


def test_register_keeps_tags_and_run(three_versions):
    client, name, versions = three_versions
    assert versions == ["1", "2", "3"]
    mv = client.get_model_version(name, "3")
    assert mv.tags["segm_mAP"] == "0.200000" and mv.tags["dataset_hash"] == "h"
    assert mv.tags["git_commit"] == "c" * 40 and mv.tags["run_id"] == mv.run_id
    assert mv.tags["config"].startswith('{"data":') and "gate.decision" not in mv.tags
    assert mv.status == "READY" and mv.run_id
    import hashlib
    import tempfile

    from training.tracking import download_model

    with tempfile.TemporaryDirectory() as tmp:  # the tag names the very files registered
        registered = open_package(download_model(client.tracking_uri, f"models:/{name}/3", tmp))
    assert mv.tags["package.sha256sums"] == hashlib.sha256(registered.files["SHA256SUMS"]).hexdigest()


def test_champion_moves_and_history_is_kept(three_versions, mlflow_stack):
    client, name, _ = three_versions
    assert get_alias(client, name, CHAMPION) is None
    assert set_alias(client, name, CHAMPION, "1", reason="first") is None
    assert set_alias(client, name, CHAMPION, "2", reason="better") == "1"
    assert set_alias(client, name, CHAMPION, "2", reason="again") == "2"  # no-op: no new interval
    assert set_alias(client, name, CHAMPION, "1", reason="rollback") == "2"
    assert get_alias(client, name, CHAMPION).version == "1"

    history = alias_history(client, name, CHAMPION)
    assert [(h.version, h.reason) for h in history] == [("1", "first"), ("2", "better"), ("1", "rollback")]
    assert history[0].until == history[1].since and history[1].until == history[2].since
    assert history[-1].until is None
    assert all(h.since < (h.until or "9") for h in history)
    # the alias itself, in PostgreSQL
    assert sql_rows(mlflow_stack, "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s",
                name, CHAMPION) == [(1,)]


def test_unknown_version_is_refused_and_nothing_moves(three_versions):
    from mlflow.exceptions import MlflowException

    client, name, _ = three_versions
    before = get_alias(client, name, "challenger")
    with pytest.raises(MlflowException):
        set_alias(client, name, "challenger", "99")
    assert get_alias(client, name, "challenger") == before
    assert all(h.version != "99" for h in alias_history(client, name, "challenger"))


def test_cli_moves_an_alias_and_shows_the_history(three_versions, mlflow_stack, monkeypatch, capsys):
    from training.registry import main

    client, name, _ = three_versions
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_stack.tracking_uri)
    assert main(["set-alias", "challenger", "3", "--name", name, "--reason", "by hand"]) == 0
    assert get_alias(client, name, "challenger").version == "3"
    assert main(["show", name]) == 0
    out = capsys.readouterr().out
    assert "history of 'challenger':" in out and "by hand" in out
    assert "0.200000" in out and "0.500000" in out  # each version's metrics, from its evidence tags
    assert main(["show", "no-such-model"]) == 1
