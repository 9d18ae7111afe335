"""Podman on a machine without a registry: the containers.conf it needs, a Debian base image made offline
with `mmdebstrap`, the project's image, and podman's Docker-compatible API (for `kfp.local.DockerRunner`).

Everything keys on content: the image's tag is a hash of the build context, so an unchanged tree reuses
the image it built before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from devstack.procs import StackError
from maskrcnn.waiting import WaitTimeout, poll_until

log = logging.getLogger("devstack")

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/debian-python:bookworm"
IMAGE_REPO = "localhost/maskrcnn-platform"
CONTEXT = ("Dockerfile", ".dockerignore", "pyproject.toml", "uv.lock", "maskrcnn", "training", "release", "pipelines", "serving",
           "batch")
SERVING_REPO = "localhost/maskrcnn-serving"
SERVING_CONTEXT = ("Dockerfile", ".dockerignore", "pyproject.toml", "uv.lock", "maskrcnn", "serving")
"""What the Dockerfile's `serving` target reads: its tag changes only when these do."""
INITIALIZER_DIR = Path(__file__).resolve().parent / "storage_initializer"
INITIALIZER_REPO = "localhost/kserve-storage-initializer"
CA_BUNDLE = Path("/etc/ssl/certs")
HARDENED = ["--user", "1000:1000", "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--network", "host"]
"""How every container here runs (a pod's securityContext): uid 1000, read-only root filesystem, no
capabilities, no new privileges; host network, so that all traffic stays on this machine."""


def containers_conf(folder: Path) -> Path:
    """runc (crun cannot run in hybrid cgroups here) and rlimits within the machine's hard limits."""
    nofile = min(20000, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[1])
    path = folder / "containers.conf"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
                    '[engine]\nruntime = "runc"\n')
    return path


@dataclass
class Podman:
    """`podman` with this project's settings (`conf_dir` holds containers.conf and the API socket)."""

    conf_dir: Path

    def __post_init__(self) -> None:
        if not shutil.which("podman"):
            raise StackError("podman is not installed (Debian: apt-get install podman buildah runc mmdebstrap)")
        self.env = {**os.environ, "CONTAINERS_CONF": str(containers_conf(self.conf_dir))}

    def __call__(self, *args: str, check: bool = True, capture: bool = True, timeout: float | None = None,
                 env: dict[str, str] | None = None, input: str | None = None) -> str:
        """Run podman. `env`: variables for `--env NAME` (value-less) to pick up, so no secret is on a command
        line; `input`: standard input (`podman secret create NAME -`)."""
        proc = subprocess.run(["podman", *args], env={**self.env, **(env or {})}, text=True, timeout=timeout, input=input,
                              stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
        if check and proc.returncode != 0:
            raise StackError(f"podman {' '.join(args[:3])} ... failed ({proc.returncode}): {(proc.stderr or '')[-2000:]}")
        return (proc.stdout or "").strip()

    def logs(self, name: str, tail: int = 3000) -> str:
        """A container's output, both streams (`podman logs` replays the container's stderr on its own
        stderr, which `__call__` does not return), its last `tail` characters."""
        proc = subprocess.run(["podman", "logs", name], env=self.env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=60)
        return proc.stdout[-tail:]

    def image_exists(self, tag: str) -> bool:
        return subprocess.run(["podman", "image", "exists", tag], env=self.env).returncode == 0

    def base(self, tag: str = BASE_IMAGE, suite: str = "bookworm") -> str:
        """A Debian image with python3, venv and CA certificates, made by mmdebstrap (no registry needed)."""
        if self.image_exists(tag):
            return tag
        if not shutil.which("mmdebstrap"):
            raise StackError("mmdebstrap is not installed (Debian: apt-get install mmdebstrap)")
        with tempfile.TemporaryDirectory() as tmp:
            tar = Path(tmp) / "base.tar"
            log.info("making the base image %s with mmdebstrap (%s)", tag, suite)
            subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                            suite, str(tar)], check=True)
            self("import", "--change", 'CMD ["/bin/bash"]', str(tar), tag)
        return tag

    def build(self, base: str | None = None, tag: str | None = None, git_commit: str = "") -> tuple[str, float]:
        """Build the project's platform image (the Dockerfile's `platform` target; reused when the context is
        unchanged). Returns (tag, seconds spent)."""
        tag = tag or f"{IMAGE_REPO}:ctx-{context_hash(ROOT, CONTEXT)}"
        return tag, self._build(ROOT, tag, base, {"GIT_COMMIT": git_commit}, target="platform")

    def build_serving(self, base: str | None = None, git_commit: str = "") -> tuple[str, float]:
        """Build the lean serving image (the Dockerfile's `serving` target: ONNX Runtime, no torch).
        Returns (tag, seconds spent)."""
        tag = f"{SERVING_REPO}:ctx-{context_hash(ROOT, SERVING_CONTEXT)}"
        return tag, self._build(ROOT, tag, base, {"GIT_COMMIT": git_commit}, target="serving")

    def build_storage_initializer(self, base: str | None = None) -> tuple[str, float]:
        """KServe's storage initializer (kserve-storage from PyPI) as an image of its own, like KServe ships it."""
        tag = f"{INITIALIZER_REPO}:ctx-{context_hash(INITIALIZER_DIR, ('Dockerfile', 'entrypoint.py'))}"
        return tag, self._build(INITIALIZER_DIR, tag, base, {})

    def _build(self, context: Path, tag: str, base: str | None, build_args: dict[str, str], target: str = "") -> float:
        if self.image_exists(tag):
            return 0.0
        base = base or self.base()
        args = ["build", "--build-arg", f"BASE={base}", "--tag", tag, *(("--target", target) if target else ())]
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        if CA_BUNDLE.is_dir():  # the host's bundle (a TLS-inspecting proxy's CA included) for pip and uv
            args += ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
        log.info("building %s from %s (minutes the first time)", tag, base)
        start = time.monotonic()
        self(*args, str(context), capture=False)
        seconds = time.monotonic() - start
        self.prune(tag)
        return seconds

    def prune(self, keep: str) -> None:
        """Remove the other builds of `keep`'s repository (each is several GB) and dangling layers."""
        repo = keep.rsplit(":", 1)[0]
        for other in self("images", "--format", "{{.Repository}}:{{.Tag}}", repo).split():
            if other != keep:
                self("rmi", "--force", other, check=False)
        self("image", "prune", "--force", check=False)

    def size(self, tag: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", tag))

    def api(self) -> tuple[str, subprocess.Popen]:
        """Start podman's Docker-compatible API; returns (DOCKER_HOST, process)."""
        socket = self.conf_dir / "podman.sock"
        socket.unlink(missing_ok=True)
        proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            poll_until(lambda: True if socket.exists() else (None if proc.poll() is None else False), timeout=30,
                       interval=0.1, what="podman system service opening its socket")
        except WaitTimeout:
            pass
        if not socket.exists():
            proc.kill()
            raise StackError("podman system service did not open its socket")
        return f"unix://{socket}", proc


def context_hash(root: Path, names: tuple[str, ...]) -> str:
    """SHA-256 over a build context's files (names and bytes), without bytecode."""
    ignored = {"__pycache__"}
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                     and not ignored & set(p.relative_to(root).parts)
                                                     and not p.name.endswith(".pyc"))
        for file in files:
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]
