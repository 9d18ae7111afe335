"""A Docker-free MLflow stack for development and tests: PostgreSQL, an S3 server and `mlflow server`.

`uv run -m training.stack up` / `down` / `status` / `env`. With Docker, use `docker-compose-mlflow.yaml`.
"""

from training.stack.local import LocalStack, Ports, StackState
from training.stack.procs import StackError

__all__ = ["LocalStack", "Ports", "StackError", "StackState"]
