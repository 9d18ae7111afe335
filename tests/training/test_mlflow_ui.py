"""MLflow's own UI on the platform's experiment, in Chromium (Playwright), against the real MLflow server of
the dev stack: the link the platform logs (`training.tracking.experiment_url`) opens the experiment in the
model-training view (MLflow 3.17 picks its view from the link's `workflowType`, else from the browser's
last choice, GenAI by default; earlier 3.x from the experiment's `mlflow.experimentKind` tag, which is set
too) on the runs table and the metric charts; and two runs compare side by side."""

from __future__ import annotations

import json
import time

import pytest
from helpers import CHROMIUM_ARGS
from mlflow.tracking import MlflowClient

from training.tracking import EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT, experiment_id, experiment_url

pytestmark = pytest.mark.slow



def test_the_experiment_opens_on_runs_and_charts_and_two_runs_compare(mlflow_stack, tmp_path):
    from playwright.sync_api import sync_playwright

    uri = mlflow_stack.tracking_uri
    client = MlflowClient(uri)
    name = f"ui-{time.time_ns()}"
    exp = experiment_id(client, name, uri)
    assert client.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
    runs = {}
    for run_name, level in (("small-lr", 0.40), ("large-lr", 0.55)):
        run_id = client.create_run(exp, run_name=run_name).info.run_id
        for epoch in range(3):
            client.log_metric(run_id, "segm_map", level + 0.05 * epoch, step=epoch)
            client.log_metric(run_id, "loss", 1.0 - 0.2 * epoch, step=epoch)
        client.log_param(run_id, "lr", "0.01" if run_name == "small-lr" else "0.05")
        client.set_terminated(run_id)
        runs[run_name] = run_id

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(experiment_url(uri, exp))
        for run_name in runs:  # the runs table
            page.get_by_text(run_name, exact=True).first.wait_for(timeout=90_000)
        page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)
        # the model-training view: the side bar has no GenAI entries (traces, judges, evaluation runs)
        assert page.get_by_text("Evaluation runs", exact=True).count() == 0 and page.get_by_text("Judges", exact=True).count() == 0

        page.goto(experiment_url(uri, exp).replace("?", "?compareRunsMode=CHART&"))  # the metric charts
        page.get_by_text("segm_map", exact=True).first.wait_for(timeout=90_000)
        page.locator("canvas, svg.main-svg, .js-plotly-plot").first.wait_for(timeout=60_000)
        page.get_by_text("loss", exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "charts.png"), full_page=True)

        compare = (f"{uri}/#/compare-runs?runs={json.dumps(list(runs.values()))}"
                   f"&experiments={json.dumps([exp])}&workflowType=machine_learning")
        page.goto(compare)
        for run_name in runs:  # side by side
            page.get_by_text(run_name, exact=True).first.wait_for(timeout=90_000)
        page.get_by_text("Comparing 2 Runs from 1 Experiment").first.wait_for(timeout=30_000)
        page.get_by_text("segm_map", exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        browser.close()
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_an_experiment_made_before_the_tag_gets_it_and_one_of_another_kind_keeps_its_own(mlflow_stack):
    uri = mlflow_stack.tracking_uri
    client = MlflowClient(uri)
    old = client.create_experiment(f"old-{time.time_ns()}")
    assert EXPERIMENT_KIND_TAG not in (client.get_experiment(old).tags or {})
    assert experiment_id(client, client.get_experiment(old).name, uri) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
    other = client.create_experiment(f"genai-{time.time_ns()}", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    experiment_id(client, client.get_experiment(other).name, uri)
    assert client.get_experiment(other).tags[EXPERIMENT_KIND_TAG] == "genai_development"
