"""The test command sets itself up (`devstack/provision.py`, called by `tests/conftest.py` before anything
is collected): what is missing is found with the real dpkg; an unprivileged user without sudo is stopped
at once with the exact command (a real process as `nobody`); as root, the install command is the one run
(recorded here rather than run: the tests do not change this machine's packages)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from devstack.provision import PACKAGES, ProvisionError, ensure, missing_packages

ROOT = Path(__file__).resolve().parents[2]
ABSENT = "maskrcnn-no-such-package"


def test_missing_packages_are_read_from_dpkg():
    assert missing_packages(["dpkg", ABSENT]) == [ABSENT]
    assert missing_packages(list(PACKAGES)) == []  # this session installed them all


def test_as_root_the_missing_packages_are_installed_and_said(capsys):
    ran = []

    def record(command, env):
        ran.append(command)
        assert env["DEBIAN_FRONTEND"] == "noninteractive"
        return subprocess.CompletedProcess(command, 0)

    assert ensure(["dpkg", ABSENT], run=record, is_root=True) == [ABSENT]
    assert ran == [["apt-get", "install", "-y", "-q", ABSENT]]
    assert f"installing the system packages the tests need: {ABSENT}" in capsys.readouterr().err
    assert ensure(["dpkg"], run=record, is_root=True) == [] and len(ran) == 1  # nothing missing: nothing run


def test_through_sudo_and_a_stale_package_list_updated_once():
    ran = []

    def first_install_fails(command, env):
        ran.append(command)
        return subprocess.CompletedProcess(command, 100 if len(ran) == 1 else 0)

    ensure([ABSENT], run=first_install_fails, is_root=False, sudo_works=lambda: True)
    assert ran == [["sudo", "-n", "apt-get", "install", "-y", "-q", ABSENT], ["sudo", "-n", "apt-get", "update", "-q"],
                   ["sudo", "-n", "apt-get", "install", "-y", "-q", ABSENT]]
    with pytest.raises(ProvisionError, match=f"installing {ABSENT} failed; the command was:\n  apt-get install"):
        ensure([ABSENT], run=lambda command, env: subprocess.CompletedProcess(command, 100), is_root=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None or not Path("/usr/bin/python3").exists(),
                    reason="needs root to become nobody, and the system Python")
def test_an_unprivileged_user_without_sudo_is_stopped_with_the_exact_command():
    """The module alone (stdlib only), copied where `nobody` can read it, run by the system Python."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="provision-"))
    try:
        folder.chmod(0o755)
        shutil.copy(ROOT / "devstack" / "provision.py", folder / "provision.py")
        (folder / "provision.py").chmod(0o644)
        code = ("from provision import ensure, ProvisionError\n"
                f"try:\n    ensure(['dpkg', {ABSENT!r}])\nexcept ProvisionError as exc:\n    print(exc)\n    raise SystemExit(4)\n")
        out = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", code], capture_output=True,
                             text=True, timeout=60, cwd=folder, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(folder)})
    finally:
        shutil.rmtree(folder)
    assert out.returncode == 4, out.stderr[-2000:]
    assert out.stdout.strip().endswith(f"run this once, then the tests again:\n  sudo apt-get install -y -q {ABSENT}")
