"""Training on a real multi-node Ray cluster: a head and a worker in two containers of the project's
image (separate filesystems, host network), started as KubeRay starts them, with token authentication.
The run is submitted the way the pipeline's train step submits it (the Ray Jobs API), with its data and
checkpoints in the S3 server and its tracking on the MLflow server; a worker container killed mid-run
is replaced (as KubeRay replaces a pod) and the run resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import TINY
from mlflow.tracking import MlflowClient


pytestmark = pytest.mark.slow


def test_nodes_answer_the_probes_and_the_jobs_api_wants_the_token(ray_nodes, podman):
    import urllib.error
    import urllib.request

    for name, port in ray_nodes.agent_ports.items():  # ray/raycluster.yaml's readiness and liveness probes
        if name not in ray_nodes.workers[1:] and podman("inspect", "--format", "{{.State.Running}}", name) == "true":
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/healthz", timeout=5) as resp:
                assert resp.status == 200 and b"raylet: success" in resp.read()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{ray_nodes.jobs_url}/api/jobs/", timeout=5)
    assert info.value.code == 401
    req = urllib.request.Request(f"{ray_nodes.jobs_url}/api/jobs/", headers={"Authorization": f"Bearer {ray_nodes.token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    # KubeRay before 1.4 starts Ray through a login shell: the venv must stay on its PATH
    assert podman("exec", ray_nodes.head, "bash", "-lc", "command -v ray") == "/opt/venv/bin/ray"
    assert podman("exec", ray_nodes.head, "id", "-u") == "1000"
    out = subprocess.run(["podman", "exec", ray_nodes.head, "touch", "/app/x"], env=podman.env, capture_output=True, text=True)
    assert "Read-only file system" in out.stderr


def _objects(uri: str) -> list[str]:
    from maskrcnn.storage import list_objects

    return [o.key for o in list_objects(uri, allow_empty=True)]


# The train step's call, in its own process as in a pipeline pod (Ray's client keeps process-wide
# authentication state, which must not leak into the other tests' local Ray).
TRAIN_STEP = """
import dataclasses, json, sys
from maskrcnn.config import load_config
from training.data.prepare import prepare_data
from maskrcnn.logs import setup_logging
from training.trainer import train
setup_logging()
cfg = load_config(sys.argv[1], sys.argv[3:])
data = prepare_data(cfg.data)
result = train(cfg, data=data, package_dir=sys.argv[2])
print(json.dumps({"result": dataclasses.asdict(result), "content_hash": data.content_hash}))
"""


def test_a_run_on_two_nodes_survives_a_lost_worker(ray_nodes, mlflow_stack, cache_dir, tmp_path, monkeypatch):
    from maskrcnn.package import open_package

    for key, value in mlflow_stack.env().items():  # this process reads the bucket (S3 keys only)
        monkeypatch.setenv(key, value)
    name = f"cluster-{time.time_ns()}"
    storage = f"s3://{mlflow_stack.state.models_bucket}/ray/{name}"
    overrides = [f"data.cache_dir={cache_dir}", f"ray.storage_path={storage}", f"ray.address={ray_nodes.jobs_url}",
                 f"tracking.tracking_uri={mlflow_stack.tracking_uri}", f"tracking.experiment={name}",
                 "train.epochs=8", "ray.max_failures=3", "tracking.register=false"]
    env = {**os.environ, **ray_nodes.client_env()}
    log_file = tmp_path / "train-step.log"
    with open(log_file, "w") as log_out:
        step = subprocess.Popen([sys.executable, "-c", TRAIN_STEP, str(TINY), str(tmp_path / "package"), *overrides],
                                env=env, stdout=subprocess.PIPE, stderr=log_out, text=True)
        # The worker node is lost once Ray Train has registered a checkpoint (its controller's snapshot
        # is in S3), while the next epochs run...
        deadline = time.monotonic() + 600
        while not any(key.endswith("checkpoint_manager_snapshot.json") for key in _objects(storage)):
            assert step.poll() is None and time.monotonic() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.3)
        ray_nodes.kill(ray_nodes.workers[-1])
        ray_nodes.add_worker()  # ...and replaced, as KubeRay replaces a pod
        out, _ = step.communicate(timeout=900)
    log_text = log_file.read_text()
    assert step.returncode == 0, log_text[-4000:]
    reported = json.loads(out.strip().splitlines()[-1])
    result = reported["result"]

    assert "Error count: 1" in log_text  # Ray Train saw the lost worker and restarted the group...
    resumed = re.search(r"resuming from (\S+) at epoch (\d+)", log_text)
    assert resumed, "the restarted worker group did not resume from a checkpoint"
    assert resumed.group(1).startswith(storage.removeprefix("s3://")) and int(resumed.group(2)) >= 1  # ...from S3
    # the data was staged once, by content hash, and the run carries the hash the prepare step computed
    assert any(key.endswith(f"datasets/{reported['content_hash'][:16]}/dataset.json") for key in _objects(storage))
    client = MlflowClient(mlflow_stack.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dataset_hash"] == reported["content_hash"]
    assert {m.step for m in client.get_metric_history(result["run_id"], "train_loss")} == set(range(8))
    assert run.data.metrics["final_segm_mAP"] == pytest.approx(result["metrics"]["segm_mAP"])
    assert set(open_package(tmp_path / "package").checksums) == {"model.pt", "config.yaml", "label_map.json",
                                                                  "metadata.json", "probe.npz", "detector.onnx",
                                                                  "reference.json", "MODEL_CARD.md"}
    assert sum("checkpoint_" in key and key.endswith("checkpoint.pt") for key in _objects(storage)) >= 1


def test_the_main_command_runs_in_the_image_as_uid_1000(podman, platform_image, tmp_path):
    """The image's defaults work for its non-root user: checkpoints in ./ray_results and the SQLite
    fallback ./mlflow.db land in the working folder /work, which uid 1000 owns (the code stays root's)."""
    out = subprocess.run(["podman", "run", "--rm", "--network", "host", "--shm-size", "1g", "--cap-drop", "ALL",
                          "--security-opt", "no-new-privileges", "--env", "RAY_AUTH_MODE=disabled", platform_image,
                          "bash", "-c", "python -m training.ray_main --config tiny --set train.epochs=1 "
                          "--set ray.num_workers=1 && ls /work && id -u"],
                         env=podman.env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    listing = out.stdout.split()
    assert {"mlflow.db", "ray_results", "mlartifacts"} <= set(listing) and listing[-1] == "1000"
    assert "done: segm mAP" in out.stderr
