"""The predictor's limits under load: how many requests it admits, how long it waits for slow clients
and stuck forward passes, and how it drains on SIGTERM.

The queue depth is derived from the memory budget, as the pod's memory limit sets it: a queued request
holds its body, and a body of B bytes costs about `REQUEST_MEMORY_FACTOR` x B while it is parsed
(the raw bytes, the JSON string, the base64-decoded image, the decoded pixels; measured: 98 MB for a
26 MB body, see `benchmarks/serving_load.py`), and each image being inferred beyond the first holds
about `IMAGE_BYTES_PER_PIXEL` x max pixels (its pixels, the network's input, its masks). So

    max_queue = (memory budget - RESIDENT_RESERVE - (workers - 1) x image working set)
                // (REQUEST_MEMORY_FACTOR x max body), in [1, 64]

which for the InferenceService's 6 GiB limit, its 2 inference workers, the default 32 MiB body and
16 MP images is 27: the `containerConcurrency` in `deployment/base/inferenceservice.yaml` (a test checks
that they agree). The default number of workers is itself bounded by memory (`workers_for_memory`).
"""

from __future__ import annotations

import logging
import math
import resource
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 1 << 20
REQUEST_MEMORY_FACTOR = 4  # bytes of memory per byte of request body while a request is held
RESIDENT_RESERVE = 2048 * MIB  # the process and one image in flight: the interpreter, torch, the model, ONNX Runtime
IMAGE_BYTES_PER_PIXEL = 40  # one image in flight (measured 446 MB at 12 MP, 37 B/px: benchmarks/serving_memory.py)
DEFAULT_MEMORY_BUDGET = 6144 * MIB  # the InferenceService's memory limit, when no cgroup limit is readable
MAX_QUEUE_CAP = 64
MAX_PIXELS = 16_000_000  # the largest image admitted by default (the predictor's and its CLI's --max-pixels)
DEFAULT_MAX_BODY = 32 * MIB
ANSWER_FACTOR = 2
MAX_ANSWER_BYTES = ANSWER_FACTOR * DEFAULT_MAX_BODY
"""The overlay pictures of one answer (about 23x their request's bytes) are capped at twice the body limit:
within the REQUEST_MEMORY_FACTOR x max body that admission counts for each queued request."""
FD_RESERVE = 128  # descriptors kept for everything that is not a client connection (files, S3, logs)
MAX_CONNECTIONS_CAP = 2048
MAX_BACKLOG = 2048  # uvicorn's default listen backlog


def image_working_set(max_pixels: int) -> int:
    """Bytes one image holds while it is inferred, at the largest size admitted."""
    return IMAGE_BYTES_PER_PIXEL * max_pixels


def workers_for_memory(memory_budget: int, max_pixels: int) -> int:
    """The most images in flight whose working sets take at most half the memory beyond the reserve (the
    other half is the queue's), at least one."""
    return max(1, 1 + (memory_budget - RESIDENT_RESERVE) // 2 // image_working_set(max_pixels))


def queue_for_memory(memory_budget: int, max_body_bytes: int, workers: int = 1, max_pixels: int = MAX_PIXELS) -> int:
    """The queue depth a memory budget affords at this body limit, beside `workers` images in flight of at
    most `max_pixels` each (see the module's docstring)."""
    free = memory_budget - RESIDENT_RESERVE - (workers - 1) * image_working_set(max_pixels)
    return max(1, min(MAX_QUEUE_CAP, free // (REQUEST_MEMORY_FACTOR * max_body_bytes)))


@dataclass(frozen=True)
class ServingLimits:
    """Admission, time-outs and shutdown. Every field is validated in `__post_init__`."""

    max_queue: int = queue_for_memory(DEFAULT_MEMORY_BUDGET, DEFAULT_MAX_BODY)  # prediction requests admitted at once
    #                  (the one running plus those waiting); beyond: 503. 32 for the pod's 6 GiB and 32 MiB bodies
    max_body_bytes: int = DEFAULT_MAX_BODY  # one request's body; larger: 400 before it is read whole
    request_timeout_s: float = 30.0  # from admission to answer; a request still queued then is dropped (504)
    retry_after_s: int = 1  # the Retry-After of a 503 (queue full, or shutting down)
    forward_limit_s: float = 30.0  # one forward pass longer than this: not live (Kubernetes restarts the pod);
    #                                longer than half of it: not ready (traffic moves away first)
    header_timeout_s: float = 10.0  # a request's headers must arrive whole within this (else 408, closed)
    body_timeout_s: float = 10.0  # the longest pause between two pieces of a request body (else closed)
    max_connections: int = 1024  # open client connections; a connection beyond this gets a 503 and is closed
    backlog: int = MAX_BACKLOG  # how many connections asyncio accepts in one go, before any of them runs (a
    #                             burst of accepts must fit in the descriptors beside max_connections)
    grace_period_s: float = 30.0  # after SIGTERM: finish admitted requests for at most this long, then exit
    drain_delay_s: float = 1.0  # after SIGTERM, answer 503 for at least this long before exiting (so that
    #                             requests already routed here get an answer, not a refused connection)

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_body_bytes", "retry_after_s", "max_connections", "backlog"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"serving limits: {name} must be an integer >= 1, got {value!r}")
        for name in ("request_timeout_s", "forward_limit_s", "header_timeout_s", "body_timeout_s", "grace_period_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"serving limits: {name} must be a number of seconds > 0, got {value!r}")
        if not 0 <= self.drain_delay_s <= self.grace_period_s:
            raise ValueError(f"serving limits: drain_delay_s must be in [0, grace_period_s={self.grace_period_s}], "
                             f"got {self.drain_delay_s!r}")


def memory_budget(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """This container's memory limit (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`), else the
    InferenceService's 6 GiB."""
    for path in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 50:  # v1 says "no limit" with a huge number
            return int(text)
    return DEFAULT_MEMORY_BUDGET


def raise_fd_limit(cap: int = 1 << 16) -> int:
    """Raise this process's soft limit on open files to its hard limit (at most `cap`); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(cap if hard == resource.RLIM_INFINITY else hard, cap)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return cap if soft == resource.RLIM_INFINITY else soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    log.info("open-file limit raised from %d to %d", soft, target)
    return target


def connections_for_fds(fd_limit: int) -> int:
    """Client connections that fit under the open-file limit, leaving `FD_RESERVE` for everything else."""
    return max(1, min(MAX_CONNECTIONS_CAP, fd_limit - FD_RESERVE))


def backlog_for_fds(fd_limit: int, max_connections: int) -> int:
    """The accept batch under the open-file limit (uvicorn's `backlog`; the kernel's listen queue is set
    back to 2048 once the server listens, see `serving.server`). asyncio accepts up to `backlog` connections in one go
    before any of them runs (and is refused, past `max_connections`), so a burst can hold that many
    descriptors at once beyond the connection limit, and a few times that while the refused ones close
    (those whose request has not arrived yet wait for it): an eighth of the descriptors left beyond
    `max_connections`, at least 8, at most uvicorn's 2048 (which an open-file limit of 32768 or more gives)."""
    return max(8, min(MAX_BACKLOG, (fd_limit - max_connections) // 8))
