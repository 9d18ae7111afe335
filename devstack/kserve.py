"""The two containers of a KServe predictor pod, run as KServe runs them: the storage initializer
downloads `storageUri` into a volume (the pod's emptyDir); the predictor, uid 1000 with a read-only root
filesystem and one memory /tmp, serves it from /mnt/models mounted read-only. Host network, 127.0.0.1."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

from devstack.podman import HARDENED, Podman
from devstack.procs import StackError


def initialize_storage(podman: Podman, initializer: str, uri: str, volume: Path,
                       env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the storage initializer on `uri` into `volume`; `env` (S3 keys) travels by name, never on a
    command line. Returns the finished process (exit 1 with the reason on a failed download)."""
    volume.chmod(0o777)  # an emptyDir: writable by the init container's uid
    return subprocess.run(["podman", "run", "--rm", *HARDENED, *[a for k in env for a in ("--env", k)],
                           "--volume", f"{volume}:/mnt/models", initializer, uri, "/mnt/models"],
                          env={**podman.env, **env}, capture_output=True, text=True, timeout=300)


def start_predictor(podman: Podman, image: str, volume: Path, port: int, timeout: float = 180,
                    cpus: float | None = None) -> str:
    """Start the predictor container on `volume` (read-only at /mnt/models) and wait until it is ready;
    returns its name. `cpus`: a CPU limit, as a pod's `resources.limits.cpu`. Raises StackError, with its
    log, if it exits or is not ready in time."""
    name = f"maskrcnn-predictor-{port}"
    # /tmp: the pod's memory emptyDir (torchvision's import needs a temporary folder)
    limit = ("--cpus", str(cpus)) if cpus else ()
    podman("run", "--detach", "--name", name, *HARDENED, *limit, "--tmpfs", "/tmp:rw,size=256m,mode=1777",
           "--volume", f"{volume}:/mnt/models:ro", image, "python", "-m", "serving", "--model-dir", "/mnt/models",
           "--model-name", "maskrcnn", "--host", "127.0.0.1", "--http-port", str(port))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5):
                return name
        except OSError:
            running = podman("inspect", "--format", "{{.State.Running}}", name, check=False) == "true"
            if not running or time.monotonic() > deadline:
                logs = podman("logs", name, check=False)[-3000:]
                podman("rm", "-f", "-t", "0", name, check=False)
                raise StackError(f"the predictor {'exited' if not running else 'was not ready in time'}:\n{logs}")
            time.sleep(0.5)
