"""`uv run -m devstack rehearse`: the cluster path on one machine, with podman, every hop a real container.

1. The local stack (PostgreSQL, Ceph's S3 gateway, MLflow) is started if it is not up.
2. The image is built from the Dockerfile on a Debian base made with mmdebstrap (reused while unchanged),
   and KServe's storage initializer beside it.
3. A two-node Ray cluster (head and worker containers, token authentication) starts as KubeRay starts it.
4. The compiled pipeline runs with KFP's DockerRunner through podman's Docker API: every step in the
   image as uid 1000; the train step submits to the Ray cluster through the Jobs API, with data and
   checkpoints in S3; a good model is registered, signed with a key pair made for the rehearsal (the
   promote step reads the private key as it reads the Secret in a cluster), published to
   s3://<models bucket>, and made champion.
5. The champion's package is downloaded by the storage initializer container into a folder, which the
   predictor container (uid 1000, read-only root filesystem) mounts read-only at /mnt/models, with the
   public key mounted as the ServingRuntime mounts its ConfigMap: it verifies the signature before it
   is ready. It is left running, on 127.0.0.1, for you to try (V1, V2, the web page at /ui).

There is no Kubernetes API server here, so no InferenceService is patched (`isvc_name` is empty).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devstack.kserve import initialize_storage, start_predictor
from devstack.local import LocalStack
from devstack.podman import Podman
from devstack.procs import StackError, free_port
from devstack.raynodes import RayNodes

log = logging.getLogger("devstack")



def rehearse(stack: LocalStack, work: Path, port: int = 0, model_name: str = "maskrcnn-rehearsal") -> dict[str, float]:
    """Run the whole path; returns the seconds each stage took. The predictor stays up (`podman rm -f` it)."""
    timings: dict[str, float] = {}
    start = time.monotonic()
    stack.up()
    env = stack.env()
    os.environ.update(env)
    timings["stack"] = time.monotonic() - start

    podman = Podman(work / "podman")
    from training.tracking import git_commit

    image, timings["build image"] = podman.build(git_commit=git_commit())
    serving, timings["build serving image"] = podman.build_serving(git_commit=git_commit())
    initializer, timings["build initializer"] = podman.build_storage_initializer()
    log.info("images %s (%.2f GB), %s (%.2f GB)", image, podman.size(image) / 1e9, serving, podman.size(serving) / 1e9)

    start = time.monotonic()
    nodes = RayNodes(podman, image, env={k: v for k, v in env.items() if k.startswith("AWS_")}).start(workers=1)
    timings["ray cluster"] = time.monotonic() - start
    docker_host, api = podman.api()
    bucket = stack.state.models_bucket
    from maskrcnn.signature import generate_keypair

    keys = Path(tempfile.mkdtemp(prefix="signing-", dir=work))
    (keys / "public").mkdir()
    (keys / "public").chmod(0o755)  # the predictor container's uid 1000 reads it, as a ConfigMap volume
    signer = generate_keypair(keys / "private.key", keys / "public" / "rehearsal.pem")
    keys.chmod(0o755)
    try:
        start = time.monotonic()
        name = f"rehearsal-{time.strftime('%Y%m%d-%H%M%S')}"
        argv = [sys.executable, "-m", "pipelines.run_local", "--runner", "docker", "--image", image,
                "--pipeline-root", str(work / "pipeline-root"), "--tracking-uri", stack.tracking_uri,
                "--model-name", model_name, "--storage-prefix", f"s3://{bucket}", "--ray-address", nodes.jobs_url,
                "--min-segm-map", "0", "--min-mask-iou", "0", "--margin", "-1",
                "--set", f"ray.storage_path=s3://{bucket}/ray/{name}", "--set", f"tracking.experiment={model_name}"]
        subprocess.run(argv, check=True, env={**os.environ, **nodes.client_env(), "DOCKER_HOST": docker_host,
                                              "MASKRCNN_SIGNING_KEY_FILE": str(keys / "private.key")})
        timings["pipeline in containers"] = time.monotonic() - start
    finally:
        api.terminate()
        nodes.stop()

    from mlflow.tracking import MlflowClient

    champion = MlflowClient(stack.tracking_uri).get_model_version_by_alias(model_name, "champion")
    uri = champion.tags["serving.storage_uri"]
    if champion.tags.get("serving.signed_by") != signer:
        raise StackError(f"champion v{champion.version} is not signed by the rehearsal's key {signer}: {champion.tags}")
    start = time.monotonic()
    volume = Path(tempfile.mkdtemp(prefix="mnt-models-", dir=work))
    done = initialize_storage(podman, initializer, uri, volume, stack.storage_initializer_env())
    if done.returncode != 0:
        raise StackError(f"the storage initializer failed on {uri}:\n{done.stderr[-3000:]}")
    port = port or free_port()
    container = start_predictor(podman, serving, volume, port, public_keys=keys / "public")  # verifies the signature
    timings["serve"] = time.monotonic() - start
    log.info("champion v%s (%s, signed by key %s) is served at http://127.0.0.1:%d/ui (stop: podman rm -f %s)",
             champion.version, uri, signer, port, container)
    return timings
