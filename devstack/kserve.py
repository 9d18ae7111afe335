"""The two containers of a KServe predictor pod, run as KServe runs them: the storage initializer
downloads `storageUri` into a volume (the pod's emptyDir); the predictor, uid 1000 with a read-only root
filesystem and one memory /tmp, serves it from /mnt/models mounted read-only. Host network, 127.0.0.1."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

from devstack.podman import HARDENED, Podman
from devstack.procs import StackError
from maskrcnn.names import MODEL_NAME
from maskrcnn.waiting import WaitTimeout, poll_until

PUBLIC_KEYS_MOUNT = "/etc/maskrcnn/public-keys"  # as deployment/base/servingruntime.yaml mounts the ConfigMap


def initialize_storage(podman: Podman, initializer: str, uri: str, volume: Path,
                       env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the storage initializer on `uri` into `volume`; `env` (S3 keys) travels by name, never on a
    command line. Returns the finished process (exit 1 with the reason on a failed download)."""
    volume.chmod(0o777)  # an emptyDir: writable by the init container's uid
    return subprocess.run(["podman", "run", "--rm", *HARDENED, *[a for k in env for a in ("--env", k)],
                           "--volume", f"{volume}:/mnt/models", initializer, uri, "/mnt/models"],
                          env={**podman.env, **env}, capture_output=True, text=True, timeout=300)


def start_predictor(podman: Podman, image: str, volume: Path, port: int, timeout: float = 180,
                    cpus: float | None = None, public_keys: Path | None = None, interval: float = 0.5) -> str:
    """Start the predictor container on `volume` (read-only at /mnt/models) and wait until it is ready;
    returns its name. `cpus`: a CPU limit, as a pod's `resources.limits.cpu`; `public_keys`: a folder of
    trusted signing keys, mounted as the ServingRuntime mounts its ConfigMap. Raises StackError, with its
    log, if it exits or is not ready in time."""
    name = f"maskrcnn-predictor-{port}"
    # /tmp: the pod's memory emptyDir (the package cache; the platform image's torchvision needs one too)
    limit = ("--cpus", str(cpus)) if cpus else ()
    keys = (("--volume", f"{public_keys}:{PUBLIC_KEYS_MOUNT}:ro"), ("--public-keys", PUBLIC_KEYS_MOUNT)) if public_keys \
        else ((), ())
    podman("run", "--detach", "--name", name, *HARDENED, *limit, "--tmpfs", "/tmp:rw,size=256m,mode=1777",
           "--volume", f"{volume}:/mnt/models:ro", *keys[0], image, "python", "-m", "serving", "--model-dir",
           "/mnt/models", "--model-name", MODEL_NAME, "--host", "127.0.0.1", "--http-port", str(port), *keys[1])
    def ready() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5):
                return name
        except OSError:
            if podman("inspect", "--format", "{{.State.Running}}", name, check=False) != "true":
                raise StackError("exited") from None
            return None

    try:
        return poll_until(ready, timeout=timeout, interval=interval, what=f"the predictor {name}")
    except (StackError, WaitTimeout) as exc:
        logs = podman.logs(name)
        podman("rm", "-f", "-t", "0", name, check=False)
        raise StackError(f"the predictor {'exited' if isinstance(exc, StackError) else 'was not ready in time'}:\n"
                         f"{logs}") from None
