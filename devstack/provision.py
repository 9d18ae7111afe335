"""The Debian packages the test suite's real servers and containers need, installed when missing.

`uv run pytest` calls `ensure()` before it collects anything (`tests/conftest.py`), so that on a fresh
Debian or Ubuntu machine with Python and uv the README's one test command sets itself up. As root it runs
`apt-get install` itself; otherwise through `sudo -n` (no password prompt); without either it stops at once
and prints the exact command to run. It prints what it installs. `.ci/run` calls the same command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

PACKAGES: dict[str, str] = {
    "postgresql": "MLflow's database (devstack/postgres.py)",
    "radosgw": "the S3 server (Ceph's RADOS Gateway, devstack/ceph.py)",
    "ceph-mon": "the S3 server's monitor",
    "ceph-osd": "the S3 server's object store",
    "ceph-common": "the S3 server's admin tools",
    "chromium": "the web page's browser test",
    "podman": "the image and the container tests",
    "buildah": "podman's image builds",
    "runc": "podman's container runtime (crun fails on these machines)",
    "mmdebstrap": "the image's Debian base, made offline",
    "etcd-server": "the Kubernetes API server's store (devstack/kubeapi.py)",
    "golang-go": "builds kube-apiserver from Debian's source package, once per machine (devstack/kube_build.py)",
    "golang-github-modern-go-reflect2-dev": "the reflect2 that kube-apiserver 1.20 needs under Go 1.19",
    "rsync": "kube-apiserver's build (its code generators)",
    "make": "kube-apiserver's build",
    "patch": "Debian's patches to the kubernetes source",
    "openssl": "the Kubernetes API server's test certificates",
    "prometheus": "the alerting rules' checks (promtool) and a real Prometheus scraping the predictor (devstack/monitoring.py)",
    "prometheus-alertmanager": "a real Alertmanager delivering the alerts (devstack/monitoring.py)",
    "docker-registry": "a real OCI registry on 127.0.0.1 that `release ship` pushes to (tests/release/test_ship.py)",
}
BINARIES = {"kubectl": "`kubectl kustomize` renders the manifests (install kubectl from your Kubernetes vendor)"}


class ProvisionError(RuntimeError):
    """System packages are missing and cannot be installed from here; the message has the command."""


def missing_packages(packages: Sequence[str]) -> list[str]:
    """Those of `packages` that dpkg does not list as installed."""
    out = []
    for name in packages:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True)
        if "install ok installed" not in done.stdout:
            out.append(name)
    return out


def _sudo_works() -> bool:
    return shutil.which("sudo") is not None and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0


def ensure(packages: Sequence[str] = tuple(PACKAGES), *, missing: Callable[[Sequence[str]], list[str]] = missing_packages,
           run: Callable[..., subprocess.CompletedProcess] = subprocess.run, is_root: bool | None = None,
           sudo_works: Callable[[], bool] = _sudo_works, say: Callable[[str], None] | None = None) -> list[str]:
    """Install the missing ones of `packages` (returns them; [] when none was missing). ProvisionError, with
    the exact command, when this machine has no apt-get, or neither root nor passwordless sudo, or the
    install fails."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    todo = missing(packages)
    absent = [f"{name} ({why})" for name, why in BINARIES.items() if shutil.which(name) is None]
    if absent:
        say(f"warning: not on PATH: {'; '.join(absent)}")
    if not todo:
        return []
    command = ["apt-get", "install", "-y", "-q", *todo]
    if shutil.which("apt-get") is None:
        raise ProvisionError(f"the tests need these system packages: {', '.join(todo)}; this machine has no apt-get "
                             f"(Debian or Ubuntu expected): install their equivalents by hand")
    root = os.geteuid() == 0 if is_root is None else is_root
    if not root:
        if not sudo_works():
            raise ProvisionError(f"the tests need these system packages: {', '.join(todo)}; run this once, then the "
                                 f"tests again:\n  sudo {' '.join(command)}")
        command = ["sudo", "-n", *command]
    say(f"installing the system packages the tests need: {' '.join(todo)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if run(command, env=env).returncode != 0:  # a fresh machine's package lists may be stale or empty
        say("apt-get install failed; updating the package lists and trying again")
        update = [*command[:command.index("apt-get")], "apt-get", "update", "-q"]
        if run(update, env=env).returncode != 0 or run(command, env=env).returncode != 0:
            raise ProvisionError(f"installing {', '.join(todo)} failed; the command was:\n  {' '.join(command)}")
    return todo
