"""A Docker-free MLflow stack for development and tests: PostgreSQL, an S3 server and `mlflow server`.

`uv run -m devstack up` / `down` / `status` / `env`. With Docker, use `docker-compose-mlflow.yaml`.
"""

from devstack.local import LocalStack, Ports, StackState
from devstack.procs import StackError

__all__ = ["LocalStack", "Ports", "StackError", "StackState"]
