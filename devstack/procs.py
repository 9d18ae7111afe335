"""Process plumbing for the local stack: ports, PID files, start, wait, stop, log tails."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from maskrcnn.waiting import WaitTimeout, poll_until

log = logging.getLogger(__name__)


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


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now and not handed out before by this process.

    The kernel may give the same ephemeral port to two binds in a row when nothing holds the first: two
    components started with those ports then collide (Ray refused a node whose node manager and agent
    drew the same one, in CI). So each port is handed out once per process."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise StackError("no free port on 127.0.0.1 that was not handed out already (1000 tries)")


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


def running_pid(pid_file: Path, program: str | None = None) -> int | None:
    """The PID in `pid_file` when that process is alive and is still the one that was started: with
    `program`, its command line names it, and it started no later than the PID file was written (a PID
    left in a stale file may since belong to an unrelated process, which `down` must never signal)."""
    pid = read_pid(pid_file)
    if pid is None or not pid_alive(pid):
        return None
    if program is not None and not is_our_process(pid, program, pid_file):
        log.warning("%s names pid %d, which is no longer %s (a stale PID file); leaving that process alone",
                    pid_file, pid, program)
        return None
    return pid


def is_our_process(pid: int, program: str, pid_file: Path, slack_s: float = 2.0) -> bool:
    """Whether `pid` runs `program` (in its first three arguments) and started before `pid_file` was written."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        started = process_start_time(pid)
        written = pid_file.stat().st_mtime
    except (OSError, ValueError):
        return False
    names = {Path(a.decode(errors="replace")).name for a in argv[:3] if a}
    return program in names and started <= written + slack_s


def process_start_time(pid: int) -> float:
    """When `pid` started, in seconds since the epoch (from /proc: boot time plus its start in clock ticks)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a server that runs its workers as child processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo += children.get(current, [])
    return tree


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket that `pid` or a descendant listens on (IPv4 and IPv6), from /proc."""
    inodes = set()
    for member in process_tree(pid):
        try:
            fds = list(Path(f"/proc/{member}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            if width == 8:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:  # four little-endian 32-bit words
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            found.add((addr, int(hex_port, 16)))
    return found


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


def http_ok(url: str, timeout: float = 2, context=None) -> bool:
    """Whether `url` answers a GET with 200 now (a readiness or health endpoint)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            return answer.status == 200
    except OSError:
        return False


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0
