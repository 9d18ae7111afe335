"""`--tune`: Ray Tune (ASHA) over learning rate and weight decay, one MLflow child run per trial.

Ray 2.60 rejects `Tuner(TorchTrainer(...))`, so each trial is a function that builds its own
`TorchTrainer` and forwards the workers' reports to Tune with `TuneReportCallback`; ASHA stops weak
trials early on the checkpoint metric. The best trial's checkpoint is evaluated and registered under
the parent run, exactly as a single training run is.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from mlflow.tracking import MlflowClient

from maskrcnn.config import Config, WorkerConfig
from training.data.prepare import prepare_data
from training.tracking import open_run, tracked_run
from training.trainer import finalize, init_ray, make_trainer, storage_path

log = logging.getLogger("training")


def _trial(params: dict[str, Any]) -> None:
    """One trial: a full Ray Train run with this trial's lr and weight decay, logged as a child run."""
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base = Config.from_dict(params["config"])
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, lr=params["lr"], weight_decay=params["weight_decay"]),
                              ray=dataclasses.replace(base.ray, num_workers=base.tune.workers_per_trial))
    trial_id = ray_tune.get_context().get_trial_id()
    data = prepare_data(cfg.data, validate=False)  # the driver validated it; this only parses
    data.content_hash = params["dataset_hash"]
    run_id, tracking_uri = open_run(cfg, data, f"trial-{trial_id}", parent_run_id=params["parent_run_id"])
    client = MlflowClient(tracking_uri)
    client.set_tag(run_id, "tune.trial_id", trial_id)
    worker = WorkerConfig(cfg, mlflow_run_id=run_id, tracking_uri=tracking_uri)
    # Tune stops a trial (an ASHA decision) by exiting its thread: not a failure.
    with tracked_run(client, run_id, stopped_status=lambda: trial_status(client, run_id, cfg.train.epochs)):
        make_trainer(cfg, worker, f"{params['run_name']}-{trial_id}", callbacks=[TuneReportCallback()]).fit()


def trial_status(client: MlflowClient, run_id: str, epochs: int) -> str:
    """The status of a trial's run that Tune stopped: FINISHED if every epoch ran, else KILLED, tagged with
    how far it got."""
    done = len(client.get_metric_history(run_id, "train_loss"))
    if done < epochs:
        client.set_tag(run_id, "tune.stopped_early", f"after {done} of {epochs} epochs")
    return "FINISHED" if done >= epochs else "KILLED"


def tune(cfg: Config):
    """Search lr and weight decay with ASHA; evaluate and register the best trial under a parent run."""
    from ray import tune as ray_tune
    from ray.train import Checkpoint
    from ray.tune.schedulers import ASHAScheduler

    data = prepare_data(cfg.data, validate=True)
    run_name = f"{cfg.ray.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    parent_id, tracking_uri = open_run(cfg, data, run_name)
    client = MlflowClient(tracking_uri)
    init_ray(cfg)
    metric = cfg.ray.checkpoint_metric
    space = {
        "lr": ray_tune.loguniform(cfg.tune.lr_min, cfg.tune.lr_max),
        "weight_decay": ray_tune.loguniform(cfg.tune.weight_decay_min, cfg.tune.weight_decay_max),
        "config": cfg.to_dict(), "parent_run_id": parent_id, "dataset_hash": data.content_hash, "run_name": run_name,
    }
    tuner = ray_tune.Tuner(
        # The trial function only drives its trainer; its workers hold the CPUs (Ray refuses an empty bundle).
        ray_tune.with_resources(_trial, {"CPU": 0.01}),
        param_space=space,
        tune_config=ray_tune.TuneConfig(
            metric=metric, mode="max", num_samples=cfg.tune.num_samples, max_concurrent_trials=cfg.tune.max_concurrent,
            # max_t past the last epoch: a trial that runs to the end finishes by itself, is not stopped.
            scheduler=ASHAScheduler(max_t=cfg.train.epochs + 1, grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                                    time_attr="training_iteration"),
        ),
        run_config=ray_tune.RunConfig(name=run_name, storage_path=storage_path(cfg)),
    )
    with tracked_run(client, parent_id):
        grid = tuner.fit()
        best = grid.get_best_result(metric=metric, mode="max", scope="all")
        # A trial Tune stopped may end before closing its run; none may stay RUNNING.
        for run in client.search_runs([client.get_run(parent_id).info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"):
            client.set_terminated(run.info.run_id, trial_status(client, run.info.run_id, cfg.train.epochs))
        best_lr, best_wd = best.config["lr"], best.config["weight_decay"]
        log.info("best trial: lr %.5g, weight decay %.3g, %s %.4f", best_lr, best_wd, metric, best.metrics[metric])
        client.log_param(parent_id, "best.lr", best_lr)
        client.log_param(parent_id, "best.weight_decay", best_wd)
        best_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=best_lr, weight_decay=best_wd))
        # The trial's best report (not its last) names the checkpoint Ray kept for it.
        history = best.metrics_dataframe.dropna(subset=["checkpoint_path"])
        checkpoint = Checkpoint(history.loc[history[metric].idxmax(), "checkpoint_path"])
        return finalize(best_cfg, data, parent_id, tracking_uri, checkpoint)
