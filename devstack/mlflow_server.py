"""`mlflow server` on PostgreSQL with artifacts proxied to S3 (`--serve-artifacts`): clients need no S3 keys."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from devstack.procs import http_ok, running_pid, spawn, stop_pid, wait_for


class MlflowServer:
    """One `mlflow server` worker on 127.0.0.1:`port`, logging to `root/mlflow.log`."""

    def __init__(self, root: Path, port: int, backend_uri: str, artifacts: str, s3_endpoint: str,
                 access_key: str, secret_key: str):
        self.root, self.port, self.backend_uri, self.artifacts = root, port, backend_uri, artifacts
        self.s3_endpoint, self.access_key, self.secret_key = s3_endpoint, access_key, secret_key
        self.log_file, self.pid_file = root / "mlflow.log", root / "mlflow.pid"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/health")

    def pid(self) -> int | None:
        return running_pid(self.pid_file, "mlflow")

    def start(self, timeout: float = 120) -> None:
        if self.pid() is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
               "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
               # one worker without the job runner: ~0.5 GB instead of ~2.6 GB
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               # the database URI holds the password: from the environment, not the command line (`ps`)
               "MLFLOW_BACKEND_STORE_URI": self.backend_uri}
        env.pop("MLFLOW_TRACKING_URI", None)
        argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1", "--serve-artifacts",
                "--artifacts-destination", self.artifacts]
        proc = spawn(argv, self.log_file, env=env, cwd=self.root, pid_file=self.pid_file)
        wait_for(self.healthy, "mlflow server", timeout, self.log_file, pid=proc.pid, interval=0.5)

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            stop_pid(pid, "mlflow server", group=True)
        self.pid_file.unlink(missing_ok=True)
