"""Bounded load and fault clients for a predictor on 127.0.0.1 (the tests and `benchmarks/serving_load.py`).

Every client here targets loopback only (anything else is refused), sends a bounded number of requests,
and distinguishes an HTTP answer from a refused or reset connection, which is what the fault runs are about.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from devstack.procs import free_port

V1_PREDICT = "/v1/models/maskrcnn:predict"


def loopback(url: str) -> tuple[str, int]:
    """(host, port) of `url`, which must be http://127.0.0.1:PORT."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname != "127.0.0.1" or not parts.port:
        raise ValueError(f"load and fault clients target http://127.0.0.1:PORT only, got {url!r}")
    return parts.hostname, parts.port


@dataclass
class Answer:
    status: int | None  # None: no HTTP answer (the connection was refused, reset or timed out)
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


def request(url: str, method: str, path: str, body: bytes | None = None, timeout: float = 60) -> Answer:
    host, port = loopback(url)
    began = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"} if body is not None else {})
        resp = conn.getresponse()
        data = resp.read()
        return Answer(resp.status, time.perf_counter() - began, {k.lower(): v for k, v in resp.getheaders()}, data)
    except (OSError, http.client.HTTPException) as exc:
        return Answer(None, time.perf_counter() - began, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def predict(url: str, body: bytes, timeout: float = 60) -> Answer:
    return request(url, "POST", V1_PREDICT, body, timeout)


@dataclass
class LoadResult:
    concurrency: int
    answers: list[Answer]

    @property
    def statuses(self) -> Counter:
        return Counter(a.status for a in self.answers)

    def latency(self, q: float, status: int = 200) -> float:
        """The q-quantile (0..1) of the latency of answers with `status`, in seconds (NaN if none)."""
        times = sorted(a.seconds for a in self.answers if a.status == status)
        if not times:
            return float("nan")
        return times[min(len(times) - 1, int(q * len(times)))]

    @property
    def errors(self) -> int:
        """Answers that are neither a success nor a clean refusal (503): 4xx/5xx others, resets, time-outs."""
        return sum(1 for a in self.answers if a.status not in (200, 503))


def run_load(url: str, bodies: list[bytes], concurrency: int, timeout: float = 60) -> LoadResult:
    """Send `bodies` to the V1 route from `concurrency` clients at once; every answer is kept."""
    with ThreadPoolExecutor(concurrency) as pool:
        return LoadResult(concurrency, list(pool.map(lambda b: predict(url, b, timeout), bodies)))


def abandon(url: str, body: bytes, linger_s: float = 0.05) -> None:
    """Send a whole prediction request and close the connection without reading the answer."""
    host, port = loopback(url)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"POST {V1_PREDICT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(linger_s)


def slow_clients(url: str, count: int, sent: bytes | None = None) -> list[socket.socket]:
    """Open `count` connections that send the start of a request's headers and then nothing."""
    host, port = loopback(url)
    sent = sent if sent is not None else f"POST {V1_PREDICT} HTTP/1.1\r\nHost: {host}\r\n".encode()
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(sent)
        socks.append(sock)
    return socks


def read_status(sock: socket.socket, timeout: float = 10) -> int | str:
    """The HTTP status the server sent on `sock` before closing it, or 'closed' / 'reset' / 'open'."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        return "open" if not data else _status(data)
    except ConnectionResetError:
        return "reset" if not data else _status(data)
    return _status(data) if data else "closed"


def _status(data: bytes) -> int | str:
    first = data.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 and first[1].isdigit() else f"garbled: {data[:40]!r}"


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's /metrics as {(sample name, sorted labels): value}."""
    answer = request(url, "GET", "/metrics")
    if answer.status != 200:
        raise RuntimeError(f"/metrics answered {answer.status}: {answer.error or answer.body[:200]!r}")
    return parse_metrics(answer.body.decode())


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text exposition as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def peak_rss_growth(pid: int, work: Callable[[], Any], interval: float = 0.01) -> tuple[float, Any]:
    """(the peak growth of `pid`'s resident memory in MB while `work()` runs, sampled every `interval` s; its result)."""
    base = rss_mb(pid)
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(rss_mb(pid))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return max(peak) - base, result


def fd_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) open-file limits of `pid`, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise RuntimeError(f"no open-file limit for process {pid}")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextmanager
def predictor(package: Path, log: Path, *args: str, launcher: list[str] | None = None,
              fd_limit: int | tuple[int, int] | None = None, timeout: float = 120,
              env: dict[str, str] | None = None) -> Iterator[Server]:
    """`python -m serving` (or `launcher`) on `package`, on 127.0.0.1 and a free port, ready; killed on exit
    if it is still running. `fd_limit`: the process's open-file limit (soft and hard, or both the same);
    `env`: variables added to this process's environment for it."""
    port = free_port()

    def limit_fds() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, fd_limit if isinstance(fd_limit, tuple) else (fd_limit, fd_limit))

    command = [*(launcher or [sys.executable, "-m", "serving"]), "--model-dir", str(package), "--host", "127.0.0.1",
               "--http-port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit_fds if fd_limit else None,
                                env={**os.environ, **env} if env else None)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout
        while request(server.url, "GET", "/v2/health/ready", timeout=2).status != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"the predictor exited with {proc.returncode}:\n{server.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the predictor was not ready in {timeout} s:\n{server.tail()}")
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def summary(result: LoadResult) -> dict[str, Any]:
    """One row of a load table."""
    ok = [a.seconds for a in result.answers if a.status == 200]
    return {"concurrency": result.concurrency, "requests": len(result.answers), "ok": len(ok),
            "503": result.statuses.get(503, 0), "errors": result.errors,
            "p50_ms": round(result.latency(0.5) * 1000, 1), "p99_ms": round(result.latency(0.99) * 1000, 1),
            "mean_ms": round(statistics.fmean(ok) * 1000, 1) if ok else float("nan")}
