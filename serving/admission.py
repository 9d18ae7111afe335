"""Admission of prediction requests: a bounded queue in front of the inference threads, a deadline per
request, work dropped for clients that left, and refusal while draining.

As Knative's queue-proxy does for `containerConcurrency`, at most `max_queue` prediction requests are
admitted at once; one more is answered 503 with `Retry-After` at once, before its body is read or
decoded (the body is drained unread, so that a plain client sees the 503, not a reset). An admitted
request carries a `Ticket`: its deadline, and whether its client is still connected. Its inference
thread checks the ticket before each forward pass, so work for a client that left, or past its
deadline, is dropped rather than computed, and counted in `maskrcnn_requests_dropped_total`.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge

from serving.observe import MODEL

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("maskrcnn_queue_depth", "Prediction requests admitted and not yet answered (running or waiting)",
                    MODEL)
QUEUE_LIMIT = Gauge("maskrcnn_queue_limit", "The most prediction requests admitted at once (max_queue)", MODEL)
REJECTED = Counter("maskrcnn_requests_rejected_total", "Prediction requests refused with 503 before their body was read",
                   ["reason"])
DROPPED = Counter("maskrcnn_requests_dropped_total", "Admitted prediction requests whose work was dropped, not answered",
                  ["reason"])
CLIENT_LEFT, DEADLINE, SHUTDOWN = "client_left", "deadline", "shutdown"
STATUS = {CLIENT_LEFT: 499, DEADLINE: 504, SHUTDOWN: 503}  # 499: nginx's "client closed request"
TICKET: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("maskrcnn_ticket", default=None)


def prediction_protocol(scope: dict[str, Any]) -> str | None:
    """"v1" or "v2" for a prediction request (`POST ...:predict`, `POST .../infer`), else None."""
    if scope.get("type") != "http" or scope.get("method") != "POST":
        return None
    path = scope.get("path", "")
    return "v1" if path.endswith(":predict") else "v2" if path.endswith("/infer") else None


def drain_budget(max_body_bytes: int) -> int:
    """How much of a refused body is received and thrown away before the refusal is sent."""
    return max(4 * max_body_bytes, 64 << 20)


class RequestDropped(Exception):
    """An admitted request whose work was dropped: its client left (499), its deadline passed (504), or the
    grace period after SIGTERM ended before it (503)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.status = STATUS[reason]


class Ticket:
    """One admitted request: its deadline and whether its client is still there. Thread-safe to read."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.stopped = asyncio.Event()  # the client left, or the server gave up on this request
        self.stop_reason: str | None = None  # read by an inference thread (an Event is for the event loop)
        self.dropped: str | None = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def stop(self, reason: str) -> None:
        """The client left (`CLIENT_LEFT`) or the server is closing (`SHUTDOWN`): do not start this work."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stopped.set()

    def drop(self, reason: str) -> RequestDropped:
        """Count this request as dropped (once) and return the exception that answers it."""
        if self.dropped is None:
            self.dropped = reason
            DROPPED.labels(reason).inc()
            log.info("request dropped before its forward pass: %s", reason)
        if reason == CLIENT_LEFT:
            return RequestDropped(reason, "the client closed the connection before its forward pass; not computed")
        if reason == SHUTDOWN:
            return RequestDropped(reason, "the server is shutting down and its grace period ended before this "
                                          "request's answer; retry on another replica")
        return RequestDropped(reason, f"the request's deadline of {self.timeout_s:g} s passed before its forward "
                                      f"pass (the server is saturated); retry later or elsewhere")

    def check(self) -> None:
        """Raise `RequestDropped` when this request's work should not start (called before a forward pass)."""
        if self.stop_reason is not None:
            raise self.drop(self.stop_reason)
        if self.remaining() <= 0:
            raise self.drop(DEADLINE)

    async def outcome(self, work: asyncio.Future) -> Any:
        """The work's result, or `RequestDropped` as soon as the client leaves, the server gives up, or the
        deadline passes (work not yet started is cancelled and never runs)."""
        stopped = asyncio.ensure_future(self.stopped.wait())
        try:
            done, _ = await asyncio.wait({work, stopped}, timeout=max(0.0, self.remaining()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if work in done:
            return work.result()
        work.cancel()  # not started: it never runs; started: it stops at its next check
        work.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, so never logged as lost
        raise self.drop(self.stop_reason or DEADLINE)


class Admission:
    """The bounded queue, the drain flag and the tickets (the app's `AdmissionMiddleware` consults it)."""

    def __init__(self, max_queue: int, request_timeout_s: float, retry_after_s: int = 1, drain_bytes: int = 64 << 20,
                 model: tuple[str, str] = ("unknown", "unknown")):
        self.max_queue = max_queue
        self.depth = QUEUE_DEPTH.labels(*model)
        QUEUE_LIMIT.labels(*model).set(max_queue)
        self.request_timeout_s, self.retry_after_s = request_timeout_s, retry_after_s
        self.drain_bytes = drain_bytes
        self.admitted = 0
        self.draining = False
        self.tickets: set[Ticket] = set()
        self.depth.set(0)

    def abort_all(self) -> None:
        """Give up on every admitted request (the grace period is over): each is answered 503 at once."""
        for ticket in list(self.tickets):
            ticket.stop(SHUTDOWN)

    async def handle(self, app, scope, receive, send) -> None:
        """Admit (or refuse) one ASGI request to `app`."""
        if prediction_protocol(scope) is None:
            return await app(scope, receive, send)
        if self.draining:
            REJECTED.labels("shutting_down").inc()
            return await refuse(scope, receive, send, 503, "the server is shutting down; retry on another replica",
                                self.drain_bytes, {"retry-after": str(self.retry_after_s)})
        if self.admitted >= self.max_queue:
            REJECTED.labels("queue_full").inc()
            return await refuse(scope, receive, send, 503, f"the server is at its limit of {self.max_queue} queued "
                                f"requests; retry after {self.retry_after_s} s", self.drain_bytes,
                                {"retry-after": str(self.retry_after_s)})
        self.admitted += 1
        self.depth.set(self.admitted)
        ticket = Ticket(self.request_timeout_s)
        self.tickets.add(ticket)
        token = TICKET.set(ticket)
        watcher: asyncio.Task | None = None
        answered = False

        async def watch() -> dict[str, Any]:
            message = await receive()  # returns when the response is complete, or when the client leaves
            if message["type"] == "http.disconnect" and not answered:
                ticket.stop(CLIENT_LEFT)
            return message

        async def receive_watched() -> dict[str, Any]:
            nonlocal watcher
            if watcher is not None:  # the body was read whole: what comes next is the watcher's
                return await asyncio.shield(watcher)
            message = await receive()
            if message["type"] == "http.disconnect":
                ticket.stop(CLIENT_LEFT)
            elif not message.get("more_body", False):
                watcher = asyncio.ensure_future(watch())
            return message

        async def send_watched(message: dict[str, Any]) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        try:
            await app(scope, receive_watched, send_watched)
        finally:
            TICKET.reset(token)
            self.tickets.discard(ticket)
            self.admitted -= 1
            self.depth.set(self.admitted)
            if watcher is not None and not watcher.done():
                watcher.cancel()


class AdmissionMiddleware:
    """ASGI middleware: requests pass `admission` before they reach the app."""

    def __init__(self, app, admission: Admission):
        self.app, self.admission = app, admission

    async def __call__(self, scope, receive, send):
        await self.admission.handle(self.app, scope, receive, send)


class BodyLimit:
    """ASGI middleware: refuse request bodies above `max_bytes` with 400 before they are read whole."""

    def __init__(self, app, max_bytes: int, drain_bytes: int | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else drain_budget(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = f"request body above the limit of {self.max_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await refuse(scope, receive, send, 400, too_big, self.drain_bytes)
        seen, more = 0, True

        async def limited():
            nonlocal seen, more
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                more = message.get("more_body", False)
                if seen > self.max_bytes:
                    raise BodyTooLarge(too_big)
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge as exc:
            await refuse(scope, receive, send, 400, str(exc), self.drain_bytes, more_body=more)


class BodyTooLarge(Exception):
    pass


async def refuse(scope, receive, send, status: int, error: str, drain_bytes: int,
                 headers: dict[str, str] | None = None, more_body: bool = True) -> None:
    """Answer `status` with `{"error": ...}` and close, after receiving and discarding the request's body
    (up to `drain_bytes`): a server that answers and closes while the client is still sending makes the
    client's kernel see a reset, and a plain client (urllib, requests) then reports that, not the answer."""
    drained = 0
    while more_body and drained < drain_bytes:
        message = await receive()
        if message["type"] != "http.request":
            break
        drained += len(message.get("body", b""))
        more_body = message.get("more_body", False)
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *((k.encode(), v.encode()) for k, v in (headers or {}).items())]})
    await send({"type": "http.response.body", "body": body})
