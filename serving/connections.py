"""Slow and excess clients, at the connection: uvicorn's HTTP/1.1 protocol with read time-outs and a
connection limit (uvicorn itself has neither a header nor a body time-out, so a client that sends
slowly holds its connection, and a file descriptor, for ever).

- Headers: a request's headers must arrive whole within `header_timeout_s` of the connection opening
  (or of the previous response, on a kept-alive connection), else the client gets 408 and is closed.
- Body: a pause longer than `body_timeout_s` between two pieces of a request body, or a body still
  incomplete `request_timeout_s` after its headers (a client trickling bytes), closes the connection
  (the request, if admitted, sees its client leave and its work is dropped).
- Answers: a client that stops reading its answer (the transport's buffer stays above its high-water
  mark) for longer than `body_timeout_s` is closed, and the buffered answer freed: an overlay answer
  (many megabytes) to a client that never reads is not held for ever.
- Connections: beyond `max_connections` open ones, a new connection is answered 503 with
  `Retry-After` and closed at once (as soon as its request has been read, so that its client sees the
  503 and not a reset), so that the process keeps serving the connections it holds. A burst is accepted
  in batches of `limits.backlog`, sized to the descriptors left beyond the connection limit
  (`serving.limits.backlog_for_fds`). Under a burst that reaches the open-file limit anyway, the event loop is asyncio's, which stops accepting for a
  second and leaves the connections waiting in the listen backlog (they are then refused with 503);
  uvloop (libuv) would accept and reset them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from prometheus_client import Counter
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.limits import ServingLimits

log = logging.getLogger(__name__)

CLOSED = Counter("maskrcnn_connections_refused_total",
                 "Client connections closed by the server's limits (header_timeout, body_timeout, write_timeout, "
                 "over_limit)", ["reason"])


def canned(status: str, error: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": error}).encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def drained(transport, most: int = 1 << 16) -> bool:
    """Read and discard what a client has sent so far (at most `most` bytes, without waiting); whether
    anything was there."""
    sock = transport.get_extra_info("socket")
    got = 0
    try:
        while got < most:
            chunk = os.read(sock.fileno(), most - got)
            if not chunk:
                break
            got += len(chunk)
    except (BlockingIOError, OSError):
        pass
    return got > 0


# uvicorn has no public hook for read time-outs or a connection limit, so the guard subclasses its h11
# protocol: the one dependency on uvicorn's private API, pinned here (and in pyproject.toml) and checked at
# start-up, so that an upgrade that changes it fails loudly instead of silently dropping the guard.
UVICORN_TESTED = "0.54."  # the release series the guard was written and tested against
PRIVATE_API = {"methods": ("connection_made", "data_received", "on_response_complete", "connection_lost",
                           "pause_writing", "resume_writing"),
               "attributes": ("connections", "cycle", "loop", "transport", "client")}


def private_api_problems(protocol: type = H11Protocol, version: str | None = None) -> list[str]:
    """What the guard needs of uvicorn's `H11Protocol` that is not there (empty: all of it is)."""
    import inspect

    import uvicorn

    version = uvicorn.__version__ if version is None else version
    problems = [] if version.startswith(UVICORN_TESTED) else [
        f"uvicorn {version} is not the tested {UVICORN_TESTED}x: check serving/connections.py against it"]
    problems += [f"H11Protocol.{name}() is gone" for name in PRIVATE_API["methods"] if not callable(getattr(protocol, name, None))]
    try:
        source = "".join(inspect.getsource(cls) for cls in protocol.__mro__ if cls.__module__ != "builtins"
                         and not cls.__module__.startswith("asyncio"))
    except (OSError, TypeError) as exc:  # installed without its .py files: nothing can be checked
        return [*problems, f"H11Protocol's source cannot be read to check it ({exc})"]
    problems += [f"H11Protocol no longer sets self.{name}" for name in PRIVATE_API["attributes"]
                 if f"self.{name} =" not in source and f"self.{name}:" not in source]
    return problems


def guarded_protocol(limits: ServingLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with `limits`' read time-outs and connection limit (pass as `Config(http=...)`).
    Refused (RuntimeError) when uvicorn's private API it builds on is not the one it was tested against."""
    problems = private_api_problems()
    if problems:
        raise RuntimeError("the connection guard cannot be built on this uvicorn: " + "; ".join(problems))
    over_limit = canned("503 Service Unavailable", f"the server is at its limit of {limits.max_connections} "
                        "connections; retry later", limits.retry_after_s)
    header_timeout = canned("408 Request Timeout", f"request headers not received within {limits.header_timeout_s:g} s")
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"limits": limits, "over_limit": over_limit, "header_timeout": header_timeout})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read time-outs, a write time-out and a connection limit; `guarded_protocol`
    makes one for a `ServingLimits` (its class attributes)."""

    limits: ServingLimits  # set by `guarded_protocol` on the subclass it makes
    over_limit = b""  # the canned 503 answer
    header_timeout = b""  # the canned 408 answer
    _timer: asyncio.TimerHandle | None = None
    _write_timer: asyncio.TimerHandle | None = None
    _refused = False
    _seen_cycle = None
    _body_deadline = 0.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refused = True
            CLOSED.labels("over_limit").inc()
            transport.write(self.over_limit)
            # closed once what the client sent is read (closing with unread data would make its kernel
            # see a reset, not the 503): at once if its request is already here, else when it comes, or
            # after half a second if it sends nothing
            if drained(transport):
                transport.close()
            else:
                self._timer = self.loop.call_later(0.5, transport.close)
            return
        self._arm(self.limits.header_timeout_s, self._headers_late)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._cancel()
            self.transport.close()
            return
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen_cycle:  # a new request's headers arrived whole
            self._seen_cycle = cycle
            self._body_deadline = self.loop.time() + self.limits.request_timeout_s
            self._cancel()
        if cycle is None or cycle.response_complete:  # between requests: the next one's headers are coming
            if self._timer is None and data:
                self._arm(self.limits.header_timeout_s, self._headers_late)
        elif cycle.more_body:  # re-armed on every piece, never past the whole body's deadline
            self._arm(max(0.0, min(self.limits.body_timeout_s, self._body_deadline - self.loop.time())), self._body_late)
        else:
            self._cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._cancel()  # uvicorn's keep-alive time-out covers the idle connection until data comes

    def connection_lost(self, exc) -> None:
        self._cancel()
        self._reading_again()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.body_timeout_s, self._not_reading)

    def resume_writing(self) -> None:
        self._reading_again()
        super().resume_writing()

    def _reading_again(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _not_reading(self) -> None:
        self._write_timer = None
        if self.transport.is_closing():
            return
        CLOSED.labels("write_timeout").inc()
        log.info("closing a connection from %s: its answer was not read for %g s", self.client, self.limits.body_timeout_s)
        self.transport.abort()  # drops the buffered answer; the handler's pending write sees the client gone

    def _arm(self, seconds: float, callback) -> None:
        self._cancel()
        self._timer = self.loop.call_later(seconds, callback)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        CLOSED.labels("header_timeout").inc()
        log.info("closing a connection from %s: headers not received within %g s", self.client, self.limits.header_timeout_s)
        self.transport.write(self.header_timeout)
        self.transport.close()

    def _body_late(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self.cycle is None or not self.cycle.more_body:
            return
        CLOSED.labels("body_timeout").inc()
        log.info("closing a connection from %s: request body paused %g s, or incomplete after %g s", self.client,
                 self.limits.body_timeout_s, self.limits.request_timeout_s)
        self.transport.close()
