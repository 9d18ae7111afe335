"""`uv run -m pipelines.run_local ...`: run the whole pipeline on this machine with KFP's local runners.

`--runner subprocess` (default): each step runs as a subprocess of this environment.
`--runner docker --image TAG`: each step runs in the project's image, as its non-root user, through
KFP's DockerRunner (Docker, or podman's Docker-compatible API in $DOCKER_HOST), on the host network.
The steps get the MLflow server of $MLFLOW_TRACKING_URI (e.g. from `uv run -m devstack up`), object
storage from the usual variables (`AWS_ENDPOINT_URL_S3`, keys; or `STORAGE_EMULATOR_HOST` for gs://),
a Ray token from $RAY_AUTH_TOKEN, the Kubernetes API of `--kubeconfig` (empty `--isvc-name`: no
deployment, the alias still moves), and the package signing key from $MASKRCNN_SIGNING_KEY_FILE (none:
published unsigned).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipelines.components import DEFAULT_IMAGE
from pipelines.pipeline import build_pipeline
from maskrcnn.logs import setup_logging

log = logging.getLogger("pipelines.run_local")


# What the steps' containers get from this environment (by name; Kubernetes: env from a Secret).
PASSED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
              "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MASKRCNN_SIGNING_KEY_FILE")


def docker_runner():
    """KFP's DockerRunner as the cluster runs the steps: the image's own (non-root) user, no capabilities,
    host network (everything stays on 127.0.0.1), a 1 GiB /dev/shm (PyTorch's data loader and Ray need
    more than 64 MiB), the environment by name."""
    import os

    from kfp import local

    return local.DockerRunner(network_mode="host", shm_size="1g", cap_drop=["ALL"], security_opt=["no-new-privileges"],
                              environment={k: os.environ[k] for k in PASSED_ENV if k in os.environ})


def _share_file(src: str, root: Path, rel: str) -> str:
    """The DockerRunner mounts only the pipeline root: copy a secret file (the kubeconfig, the signing key)
    there, readable by uid 1000 only."""
    import os
    import shutil

    copy = root / rel
    copy.parent.mkdir(exist_ok=True)
    copy.touch(mode=0o600)  # owner-only from the first byte
    shutil.copyfile(src, copy)
    copy.chmod(0o600)
    if os.getuid() == 0:
        os.chown(copy.parent, 1000, 1000)
        os.chown(copy, 1000, 1000)
    else:  # a host user other than root cannot give the file to the container's uid 1000
        copy.chmod(0o644)
        log.warning("%s is readable by every user of this machine while the run lasts (delete the pipeline root "
                    "after it; as root, it is given to uid 1000 only)", copy)
    return str(copy)


def run_local(pipeline_root: str | Path, runner: str = "subprocess", image: str = DEFAULT_IMAGE, **params: Any) -> None:
    """Run the pipeline with KFP's SubprocessRunner or DockerRunner (its steps in containers of `image`);
    raises RuntimeError when a step fails."""
    from kfp import local

    import warnings

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if runner == "docker":
        root.chmod(0o1777)  # the steps run as the image's uid 1000 and write their outputs here
        if params.get("kubeconfig"):
            params = {**params, "kubeconfig": _share_file(params["kubeconfig"], root, ".kube/config")}
        if os.environ.get("MASKRCNN_SIGNING_KEY_FILE"):  # the promote step's key (a mounted Secret in a cluster)
            os.environ["MASKRCNN_SIGNING_KEY_FILE"] = _share_file(os.environ["MASKRCNN_SIGNING_KEY_FILE"], root,
                                                                  ".signing/private.pem")
        from pipelines import docker_status

        docker_status.install()  # else a failed step passes (kubeflow/pipelines#13332)
        chosen = docker_runner()
    else:
        # The SubprocessRunner runs the steps in this environment, not in their image: intended here.
        warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom")
        chosen = local.SubprocessRunner(use_venv=False)
    local.init(runner=chosen, pipeline_root=str(root), raise_on_error=True)
    build_pipeline(image)(**params)


# Where a local run differs from the pipeline's own defaults (or gives the required ones one): the tiny
# config, the local stack's bucket and MLflow, and no InferenceService unless one is named.
LOCAL_DEFAULTS = {"config": "tiny", "storage_prefix": "s3://models", "isvc_name": "",
                  "tracking_uri": "$MLFLOW_TRACKING_URI"}
HELP = {
    "config": "config name in maskrcnn/configs or a YAML path",
    "overrides": "override a config field, SECTION.FIELD=VALUE (repeatable)",
    "tracking_uri": "the MLflow server (default $MLFLOW_TRACKING_URI; empty: ./mlflow.db)",
    "storage_prefix": "where serving packages go (s3:// or gs://)",
    "isvc_name": "InferenceService to point at the new model (empty: none)",
}


def get_args_parser() -> argparse.ArgumentParser:
    """One flag per pipeline parameter, with the pipeline's own types and defaults (but LOCAL_DEFAULTS)."""
    import inspect

    p = argparse.ArgumentParser(prog="python -m pipelines.run_local", description=__doc__)
    for name, param in inspect.signature(build_pipeline().pipeline_func).parameters.items():
        default = LOCAL_DEFAULTS.get(name, param.default)
        if default == "$MLFLOW_TRACKING_URI":
            default = os.environ.get("MLFLOW_TRACKING_URI", "")
        text = f"{HELP.get(name, '')} (default: {default!r})".strip()
        if param.annotation in (list, "list"):
            p.add_argument("--set", dest=name, action="append", default=list(default), metavar="SECTION.FIELD=VALUE", help=text)
        elif default is inspect.Parameter.empty:
            p.add_argument(f"--{name.replace('_', '-')}", type=param.annotation, required=True, help=HELP.get(name, ""))
        else:
            p.add_argument(f"--{name.replace('_', '-')}", type=param.annotation, default=default, help=text)
    p.add_argument("--pipeline-root", default="./pipeline_runs", help="where step artifacts are written")
    p.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                   help="steps as subprocesses here, or in containers of --image (Docker or podman's API in $DOCKER_HOST)")
    p.add_argument("--image", default=os.environ.get("MASKRCNN_IMAGE", DEFAULT_IMAGE),
                   help=f"the steps' image for --runner docker (default $MASKRCNN_IMAGE, else {DEFAULT_IMAGE})")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = vars(get_args_parser().parse_args(argv))
    root, runner, image = args.pop("pipeline_root"), args.pop("runner"), args.pop("image")
    try:
        run_local(root, runner, image, **args)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
