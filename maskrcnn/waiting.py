"""One policy for waiting on servers and retrying what fails for a moment (tenacity underneath).

- `poll_until(check, ...)`: call `check()` every `interval` seconds until it returns something other than
  None, for at most `timeout` seconds; exceptions that `transient(exc)` calls passing (a 503, a dropped
  connection) are logged and polled through; any other exception ends the wait at once.
- `retry_call(func, ...)`: one call, retried with exponential backoff while its error is transient.

Used by the release step (the Kubernetes API), remote training (the Ray Jobs API) and the dev stack.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

import tenacity

log = logging.getLogger(__name__)

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """`poll_until` ran out of time; the message says what was awaited and what was last seen (`seen`)."""

    def __init__(self, message: str, seen: str = ""):
        super().__init__(message)
        self.seen = seen


def describe(exc: BaseException) -> str:
    """`Type: message` on one line (the kubernetes client's errors span several), at most 300 characters."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def never(exc: BaseException) -> bool:
    return False


def connection_error(exc: BaseException) -> bool:
    """A network error that a retry may cure: refused or reset connections, timeouts, and HTTP 408, 429 and
    5xx answers from the `kubernetes` client, `requests`, `urllib3` and botocore."""
    status = getattr(exc, "status", None) or getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int) and (status in (408, 429) or 500 <= status <= 599):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, (ConnectionError, TimeoutError)) or bool(names & {
        "MaxRetryError", "ProtocolError", "NewConnectionError", "ReadTimeoutError",  # urllib3
        "ConnectionError", "Timeout", "ChunkedEncodingError",  # requests
        "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"})  # botocore


def _log_retry(what: str) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        if state.outcome is not None and state.outcome.failed:
            exc = state.outcome.exception()
            log.warning("%s: %s (attempt %d; retrying)", what, describe(exc), state.attempt_number)

    return before_sleep


def poll_until(check: Callable[[], T | None], *, timeout: float, interval: float, what: str,
               transient: Callable[[BaseException], bool] = never, last: Callable[[], str] = lambda: "") -> T:
    """The first non-None result of `check()`, polled every `interval` s; WaitTimeout after `timeout` s
    (its message ends with `last()`, what the last poll saw)."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout), wait=tenacity.wait_fixed(interval),
        retry=tenacity.retry_if_result(lambda result: result is None) | tenacity.retry_if_exception(transient),
        before_sleep=_log_retry(what), reraise=False)
    try:
        return retrying(check)
    except tenacity.RetryError as exc:
        outcome = exc.last_attempt
        seen = f"last error: {describe(outcome.exception())}" if outcome.failed else last()
        raise WaitTimeout(f"{what}: not within {timeout:g} s" + (f" ({seen})" if seen else ""), seen) from None


def retry_call(func: Callable[..., T], *args: Any, what: str, attempts: int = 5, max_wait: float = 10.0,
               transient: Callable[[BaseException], bool] = connection_error, **kwargs: Any) -> T:
    """`func(*args, **kwargs)`, retried up to `attempts` times with exponential backoff (0.5 s doubling, at
    most `max_wait`) while it raises a transient error; the last error is re-raised."""
    retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(attempts),
                                 wait=tenacity.wait_exponential(multiplier=0.5, max=max_wait),
                                 retry=tenacity.retry_if_exception(transient), before_sleep=_log_retry(what),
                                 reraise=True)
    return retrying(func, *args, **kwargs)
