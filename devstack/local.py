"""The local stack: PostgreSQL + an S3 server (Ceph RADOS Gateway) + `mlflow server`, on 127.0.0.1.

Everything lives in one folder (default `./.stack`, or `$MASKRCNN_STACK_DIR`): data, logs, PID files and
`stack.json` with the ports and generated credentials (mode 600). Ports are fixed when the folder is
created; later `up`s reuse them, so the data and the URIs stay valid.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from devstack.ceph import CephS3
from devstack.mlflow_server import MlflowServer
from devstack.postgres import Postgres
from devstack.procs import StackError, port_is_free

log = logging.getLogger(__name__)


@dataclass
class Ports:
    postgres: int = 15432
    s3: int = 19000
    ceph_mon: int = 13300
    mlflow: int = 5000


@dataclass
class StackState:
    """What `up` needs to find the same stack again; written once, to `stack.json`."""

    ports: Ports = field(default_factory=Ports)
    pg_user: str = "mlflow"
    pg_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    pg_db: str = "mlflow"
    s3_access_key: str = field(default_factory=lambda: "STACK" + secrets.token_hex(8).upper())
    s3_secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    bucket: str = "mlflow"
    models_bucket: str = "models"

    @classmethod
    def load(cls, path: Path) -> StackState:
        raw = json.loads(path.read_text())
        return cls(**{**raw, "ports": Ports(**raw["ports"])})

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        path.chmod(0o600)


def default_root() -> Path:
    return Path(os.environ.get("MASKRCNN_STACK_DIR") or ".stack").resolve()


class LocalStack:
    """Start, stop and inspect the three services; `env()` is what a client exports."""

    def __init__(self, root: Path | None = None, ports: Ports | None = None):
        self.root = (root or default_root()).resolve()
        state_file = self.root / "stack.json"
        if state_file.is_file():
            self.state = StackState.load(state_file)
            if ports is not None and ports != self.state.ports:
                log.warning("%s already exists with ports %s; keeping them", self.root, self.state.ports)
        else:
            self.state = StackState(ports=ports or Ports())
        st, p = self.state, self.state.ports
        self.postgres = Postgres(self.root / "postgres", p.postgres, st.pg_user, st.pg_password, st.pg_db)
        self.s3 = CephS3(self.root / "ceph", p.s3, p.ceph_mon, st.s3_access_key, st.s3_secret_key)
        self.mlflow = MlflowServer(self.root / "mlflow", p.mlflow, self.postgres.url, f"s3://{st.bucket}/artifacts",
                                   self.s3.endpoint, st.s3_access_key, st.s3_secret_key)

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.url

    def env(self) -> dict[str, str]:
        """Variables for clients: MLflow (artifacts go through the server), and S3 for data and model packages."""
        return {"MLFLOW_TRACKING_URI": self.mlflow.url, "AWS_ENDPOINT_URL_S3": self.s3.endpoint,
                "AWS_ACCESS_KEY_ID": self.state.s3_access_key, "AWS_SECRET_ACCESS_KEY": self.state.s3_secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def _check_ports(self) -> None:
        p = self.state.ports
        running = self.status()
        for service, port, key in (("PostgreSQL", p.postgres, "postgres"), ("S3 gateway", p.s3, "radosgw"),
                                   ("Ceph monitor", p.ceph_mon, "ceph-mon"), ("mlflow server", p.mlflow, "mlflow")):
            if running[key] is None and not port_is_free(port):
                raise StackError(f"{service}: port {port} on 127.0.0.1 is already taken by another process; stop it, "
                                 f"or create the stack in another folder with other ports (`up --help`)")

    def up(self) -> None:
        """Create what is missing, start what is stopped, and wait until every service answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_ports()
        self.state.save(self.root / "stack.json")
        log.info("PostgreSQL on 127.0.0.1:%d", self.state.ports.postgres)
        self.postgres.init()
        self.postgres.start()
        log.info("S3 (Ceph RADOS Gateway) on %s", self.s3.endpoint)
        if self.s3.initialized():
            self.s3.start()
        else:
            self.s3.init()
        for bucket in (self.state.bucket, self.state.models_bucket):
            self.s3.ensure_bucket(bucket)
        log.info("mlflow server on %s", self.mlflow.url)
        self.mlflow.start()

    def down(self) -> None:
        """Stop every service by PID (MLflow first, the database last); data stays in the folder."""
        self.mlflow.stop()
        self.s3.stop()
        self.postgres.stop()

    def status(self) -> dict[str, int | None]:
        """PID of each running process (None when stopped)."""
        return {"postgres": self.postgres.pid(), **self.s3.pids(), "mlflow": self.mlflow.pid()}
