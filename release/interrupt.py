"""SIGTERM and SIGINT turned into the release's unwind.

Kubernetes stops a pod (a cancelled KFP run, a node drain, an eviction) with SIGTERM, then SIGKILL after
the pod's grace period (30 s by default). Python's default for SIGTERM is to die on the spot, which would
leave an InferenceService half-way through a release. Inside `unwind_on_signals()`, the first SIGTERM or
SIGINT raises `Interrupted` in the main thread, wherever it is waiting (a readiness wait, a canary's
analysis, an API call), so that the release's `except BaseException` puts back what it changed and tags
the version; further signals are logged and ignored until the unwind ends (it makes a few bounded API
calls and does not wait for readiness, so it fits in the default grace period).

`Interrupted` is a BaseException, like KeyboardInterrupt: a broad `except Exception` does not swallow it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The process was asked to stop (`signum`); raised once, into the main thread."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # as a shell reports a process the signal ended


@contextmanager
def unwind_on_signals() -> Iterator[None]:
    """Within the block, the first SIGTERM/SIGINT raises `Interrupted`; later ones are ignored (logged) so
    that the unwind runs to its end. Outside the main thread (where Python cannot take signals) it does
    nothing. The previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = threading.Event()

    def handler(signum: int, _frame) -> None:
        if raised.is_set():
            log.warning("%s received while unwinding: ignored; the unwind puts back what this release changed and "
                        "ends by itself", signal.Signals(signum).name)
            return
        raised.set()
        log.warning("%s received: unwinding the release", signal.Signals(signum).name)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
