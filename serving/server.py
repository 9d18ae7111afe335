"""Run the app under uvicorn with the predictor's limits, and shut down as Kubernetes expects.

On SIGTERM (Kubernetes deleting the pod; its endpoints are removed at the same time, but not at once
everywhere), as Knative's queue-proxy drains:
1. readiness answers 503 at once, so that no new traffic is routed here;
2. the listening socket stays open: a prediction that still arrives is answered 503 with `Retry-After`
   (a client or mesh retries it elsewhere), never a refused or reset connection;
3. requests already admitted, running or queued, are finished;
4. once none is left (and at least `drain_delay_s` after the signal), or when `grace_period_s` has
   passed (what is left is answered 503), the server closes and the process exits 0 (1 when a forward
   pass is stuck and its thread cannot be joined). `terminationGracePeriodSeconds` in the manifests
   is longer than the grace period (a test checks), so Kubernetes never kills a drain half-way.
A second SIGINT (Ctrl-C) stops at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from types import FrameType

import uvicorn

from serving.admission import Admission
from serving.connections import guarded_protocol
from serving.limits import MAX_BACKLOG, ServingLimits

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that drains on SIGTERM (see the module's docstring) and exits without re-raising it."""

    def __init__(self, config: uvicorn.Config, admission: Admission, limits: ServingLimits):
        super().__init__(config)
        self.admission, self.limits = admission, limits
        self.drain_started: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # asyncio accepts at most `limits.backlog` connections in one go (it passes the listen backlog on as
        # that count; see serving.limits.backlog_for_fds); the kernel's queue of connections waiting to be
        # accepted is set back to uvicorn's 2048, so that a burst waits there rather than losing its SYNs
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                with socket.socket(fileno=os.dup(sock.fileno())) as listening:
                    listening.listen(MAX_BACKLOG)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler records the signal and raises it again after shutdown (exit status 143);
        # a drained shutdown is a clean exit
        if self.drain_started is not None:
            if sig == signal.SIGINT:
                log.warning("second interrupt: stopping now")
                self.should_exit = self.force_exit = True
            return
        self.drain_started = time.monotonic()
        self.admission.draining = True
        log.info("signal %s: draining (readiness off, new predictions answered 503); %d request(s) to finish, at most "
                 "%g s", signal.Signals(sig).name, self.admission.admitted, self.limits.grace_period_s)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            idle = self.admission.admitted == 0
            if (idle and waited >= self.limits.drain_delay_s) or waited >= self.limits.grace_period_s:
                if self.admission.admitted:
                    log.error("grace period of %g s over with %d request(s) unfinished; answering them 503 and closing",
                              self.limits.grace_period_s, self.admission.admitted)
                    self.admission.abort_all()
                else:
                    log.info("drained after %.1f s; closing", waited)
                self.should_exit = True
        return await super().on_tick(counter)


def make_server(app, admission: Admission, limits: ServingLimits, host: str, port: int) -> DrainingServer:
    config = uvicorn.Config(app, host=host, port=port, log_config=None, timeout_keep_alive=65, http=guarded_protocol(limits),
                            backlog=limits.backlog, timeout_graceful_shutdown=3, lifespan="off", loop="asyncio")  # see serving.connections
    return DrainingServer(config, admission, limits)
