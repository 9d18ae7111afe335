"""Process plumbing for the local stack: ports, PID files, start, wait, stop, log tails."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from training.waiting import WaitTimeout, poll_until


class StackError(RuntimeError):
    """A stack service could not be set up, started or stopped; the message says which and why."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def write_private(path: Path, text: str) -> Path:
    """Write a file that only its owner can read, created so from the first byte (no window in which a
    default-umask file holds the secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return path


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_binary(name: str, hint: str, search: list[Path] | None = None) -> str:
    for folder in search or []:
        if (folder / name).is_file():
            return str(folder / name)
    path = shutil.which(name)
    if path is None:
        raise StackError(f"binary {name!r} not found on PATH; {hint}")
    return path


def tail(path: Path, lines: int = 30) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is not alive.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def running_pid(pid_file: Path) -> int | None:
    pid = read_pid(pid_file)
    return pid if pid is not None and pid_alive(pid) else None


def spawn(argv: list[str], log_file: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
          pid_file: Path | None = None) -> subprocess.Popen:
    """Start a detached process (its own session, so it outlives this one) logging to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    if pid_file is not None:
        pid_file.write_text(f"{proc.pid}\n")
    return proc


def run(argv: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 120,
        input_text: str | None = None) -> str:
    """Run a set-up command; a failure raises StackError with its output."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, input=input_text)
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"{what}: `{' '.join(argv)}` did not finish in {timeout:.0f} s") from exc
    if done.returncode != 0:
        out = (done.stdout + done.stderr).strip().splitlines()[-20:]
        raise StackError(f"{what}: `{' '.join(argv)}` failed (exit {done.returncode}):\n" + "\n".join(f"    {x}" for x in out))
    return done.stdout


def wait_for(check: Callable[[], bool], what: str, timeout: float, log_file: Path,
             pid: int | None = None, interval: float = 0.25) -> None:
    """Poll `check` until it is true; fail with the log's tail if the process dies or time runs out."""
    def ready() -> bool | None:
        if check():
            return True
        if pid is not None and not pid_alive(pid):
            raise StackError(f"{what} exited during start-up; last lines of {log_file}:\n{tail(log_file)}")
        return None

    try:
        poll_until(ready, timeout=timeout, interval=interval, what=what)
    except WaitTimeout:
        raise StackError(f"{what} did not become ready within {timeout:.0f} s; last lines of {log_file}:\n"
                         f"{tail(log_file)}") from None


def stop_pid(pid: int, what: str, timeout: float = 30, group: bool = False) -> None:
    """SIGTERM, wait, then SIGKILL."""
    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    send(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        raise StackError(f"{what} (pid {pid}) did not stop")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0
