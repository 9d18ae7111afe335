"""One release at a time per InferenceService, and its intent written down before anything changes.

A `coordination.k8s.io/v1` Lease named `<inferenceservice>-release` in the InferenceService's namespace
is the lock: `promote`, `rollback` and `recover` take it before they touch the service, renew it while
they work (every third of its duration, from a background thread) and release it when they end. The
Lease also carries the release's **intent** (annotation `release.maskrcnn.io/intent`, JSON): which model
version, which storageUri it is moving to, what was served before (URI and canary percent) and how far
it got (`phase`). A process that ends normally (promoted, or unwound) clears the intent. One that was
killed (SIGKILL, a node lost) leaves it behind with a Lease that stops being renewed: the next release
refuses to start and says to run `uv run -m release recover`, which reads the intent and finishes or
undoes exactly what it says (`release.transaction`).

Every write of the Lease is conditional on the resourceVersion read (a replace with
`metadata.resourceVersion`): two processes can never both believe they hold it. Kubernetes' own leader
election (client-go `leaderelection`, `LeaseLock`) uses the same object and the same rule; an expired
Lease is one whose `renewTime + leaseDurationSeconds` has passed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from maskrcnn.waiting import retry_call

log = logging.getLogger(__name__)

LEASE_SUFFIX = "-release"
INTENT_ANNOTATION = "release.maskrcnn.io/intent"
DEFAULT_DURATION_S = 60
PHASES = ("registering", "deploying", "canary", "serving")
"""How far a release got: nothing patched yet; the storageUri patched (waiting for KServe to serve it);
the canary being judged; the new version serves all the traffic and only the champion alias is left."""


class LeaseError(RuntimeError):
    """The Lease could not be read or written (the message says which and why)."""


class ReleaseInFlight(LeaseError):
    """Another release of this InferenceService holds the Lease, or an interrupted one left its intent."""


class LeaseLost(LeaseError):
    """Someone else took the Lease over while this release held it (it was not renewed in time)."""


def holder_identity() -> str:
    """This process, as the Lease names it: the host (the pod's name in Kubernetes), the pid, a nonce."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Intent:
    """What a release is doing to one InferenceService, written before it changes anything."""

    action: str  # "promote" or "rollback"
    model_name: str
    isvc: str
    namespace: str
    holder: str
    phase: str = "registering"
    version: str = ""  # known once registered
    storage_uri: str = ""  # where the service is being moved to
    previous_uri: str | None = None  # what it served before this release
    previous_canary: int | None = None
    previous_annotations: dict[str, str | None] = field(default_factory=dict)  # the release annotations before
    canary_percent: int | None = None
    started_at: str = field(default_factory=lambda: now().isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if self.action not in ("promote", "rollback"):
            raise ValueError(f"intent: action must be promote or rollback, got {self.action!r}")
        if self.phase not in PHASES:
            raise ValueError(f"intent: phase must be one of {PHASES}, got {self.phase!r}")
        # read back from an annotation: every field is checked, so the unwind never patches in a wrong type
        for name in ("model_name", "isvc", "namespace", "holder", "version", "storage_uri", "started_at"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"intent: {name} must be a string, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.previous_uri, (str, type(None))):
            raise ValueError(f"intent: previous_uri must be a string or null, got {type(self.previous_uri).__name__}")
        for name in ("previous_canary", "canary_percent"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100):
                raise ValueError(f"intent: {name} must be an integer in [0, 100] or null, got {value!r}")
        if not isinstance(self.previous_annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, (str, type(None))) for k, v in self.previous_annotations.items()):
            raise ValueError("intent: previous_annotations must map names to strings or null")

    def at(self, phase: str, **changes: Any) -> Intent:
        return replace(self, phase=phase, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> Intent:
        try:
            values = json.loads(text)
            if not isinstance(values, dict):
                raise TypeError(f"expected an object, got {type(values).__name__}")
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise LeaseError(f"{where}: annotation {INTENT_ANNOTATION} is not a release intent ({exc}); inspect it "
                             f"with kubectl get lease -o yaml") from None

    def describe(self) -> str:
        return (f"{self.action} of {self.model_name} v{self.version or '?'} by {self.holder} since {self.started_at} "
                f"(phase {self.phase}; {self.previous_uri} -> {self.storage_uri or '?'})")


def coordination_api(kubeconfig: str = "") -> Any:
    from kubernetes import client

    from release.deploy import custom_objects_api

    return client.CoordinationV1Api(custom_objects_api(kubeconfig).api_client)


def _fmt_time(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # MicroTime


@dataclass
class LeaseState:
    """The Lease as read: its holder, whether it is still renewed, and the intent it carries."""

    resource_version: str
    holder: str | None
    expires: datetime | None
    intent: Intent | None

    @property
    def live(self) -> bool:
        return bool(self.holder) and self.expires is not None and self.expires > now()


class ReleaseLease:
    """The Lease of one InferenceService, held by this process between `acquire` and `release`."""

    def __init__(self, isvc: str, namespace: str, *, api: Any = None, kubeconfig: str = "",
                 duration_s: int = DEFAULT_DURATION_S, holder: str = ""):
        if duration_s < 3:
            raise ValueError(f"lease duration must be >= 3 s, got {duration_s}")
        self.api = api or coordination_api(kubeconfig)
        self.name, self.namespace, self.duration_s = f"{isvc}{LEASE_SUFFIX}", namespace, int(duration_s)
        self.holder = holder or holder_identity()
        self.intent: Intent | None = None
        self._version = ""
        self._acquired = now()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str = ""

    @property
    def where(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    def read(self) -> LeaseState | None:
        """The Lease as it is now (None when it does not exist)."""
        from kubernetes.client.exceptions import ApiException

        try:
            lease = retry_call(self.api.read_namespaced_lease, self.name, self.namespace, what=f"reading {self.where}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise LeaseError(f"{self.where}: cannot read it ({exc.status} {exc.reason})") from exc
        spec = lease.spec
        expires = None
        if spec is not None and spec.renew_time is not None and spec.lease_duration_seconds:
            renewed = spec.renew_time if spec.renew_time.tzinfo else spec.renew_time.replace(tzinfo=UTC)
            expires = renewed + timedelta(seconds=spec.lease_duration_seconds)
        text = (lease.metadata.annotations or {}).get(INTENT_ANNOTATION)
        return LeaseState(lease.metadata.resource_version, spec.holder_identity if spec else None, expires,
                          Intent.from_json(text, self.where) if text else None)

    def _body(self, intent: Intent | None, holder: str | None, resource_version: str = "") -> dict[str, Any]:
        stamp = _fmt_time(now())
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace,
                                    "labels": {"app.kubernetes.io/managed-by": "maskrcnn-release"},
                                    "annotations": {INTENT_ANNOTATION: intent.to_json()} if intent else {}}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        spec = {"holderIdentity": holder, "leaseDurationSeconds": self.duration_s,
                "acquireTime": _fmt_time(self._acquired), "renewTime": stamp} if holder else {"leaseDurationSeconds": self.duration_s}
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    def _write(self, body: dict[str, Any], create: bool = False) -> str:
        """Create or replace (conditional on the body's resourceVersion); returns the new resourceVersion.
        A conflict (409) is returned to the caller as the ApiException."""
        if create:
            out = retry_call(self.api.create_namespaced_lease, self.namespace, body, what=f"creating {self.where}")
        else:
            out = retry_call(self.api.replace_namespaced_lease, self.name, self.namespace, body,
                             what=f"writing {self.where}")
        return out.metadata.resource_version

    def acquire(self, intent: Intent) -> None:
        """Take the Lease for `intent`, or raise ReleaseInFlight naming who holds it (or what an interrupted
        release left behind, and the command that recovers it)."""
        from kubernetes.client.exceptions import ApiException

        self._acquired = now()
        for _ in range(3):
            state = self.read()
            try:
                if state is None:
                    self._version = self._write(self._body(intent, self.holder), create=True)
                else:
                    self._refuse_if_busy(state)
                    self._version = self._write(self._body(intent, self.holder, state.resource_version))
            except ApiException as exc:
                if exc.status == 409:  # someone else created or took it between our read and write: look again
                    continue
                raise LeaseError(f"{self.where}: cannot take it ({exc.status} {exc.reason})") from exc
            self.intent = intent
            self._start_renewing()
            log.info("%s taken by %s for the %s of %s", self.where, self.holder, intent.action, intent.model_name)
            return
        raise ReleaseInFlight(f"{self.where}: another release took it at the same moment; nothing was changed")

    def _refuse_if_busy(self, state: LeaseState) -> None:
        if state.live:
            what = state.intent.describe() if state.intent else "a release"
            raise ReleaseInFlight(f"{self.where}: {what} is in flight (held by {state.holder} until "
                                  f"{state.expires:%H:%M:%S} UTC unless renewed); nothing was changed: wait for it "
                                  f"to end, then try again")
        if state.intent is not None:
            raise ReleaseInFlight(f"{self.where}: an interrupted {state.intent.describe()} left its intent and nobody "
                                  f"holds it any more; nothing was changed: run `uv run -m release recover "
                                  f"--isvc-name {state.intent.isvc} --namespace {state.intent.namespace}` to finish or "
                                  f"undo it first")

    def take_over(self) -> Intent | None:
        """For `recover`: take an expired (or free) Lease, keeping the intent it carries; ReleaseInFlight while
        its holder still renews it. Returns the intent (None: nothing to recover)."""
        from kubernetes.client.exceptions import ApiException

        state = self.read()
        if state is None or state.intent is None:
            return None
        if state.live:
            raise ReleaseInFlight(f"{self.where}: {state.intent.describe()} is still in flight (held by {state.holder} "
                                  f"until {state.expires:%H:%M:%S} UTC unless renewed): it will end in one of its two "
                                  f"states by itself; recover only what nobody holds")
        self._acquired = now()
        try:
            self._version = self._write(self._body(state.intent, self.holder, state.resource_version))
        except ApiException as exc:
            if exc.status == 409:
                raise ReleaseInFlight(f"{self.where}: someone else took it at the same moment; nothing was changed") from exc
            raise LeaseError(f"{self.where}: cannot take it ({exc.status} {exc.reason})") from exc
        self.intent = state.intent
        self._start_renewing()
        return state.intent

    def record(self, intent: Intent) -> None:
        """Write the release's progress into the Lease (conditional on holding it); LeaseLost otherwise."""
        self._replace(intent, self.holder)
        self.intent = intent

    def release(self, keep_intent: bool = False) -> None:
        """Stop renewing and free the Lease; `keep_intent` leaves the intent for `recover` (an unwind that
        could not restore the service). Never raises: a Lease left held expires by itself."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(5)
        try:
            self._replace(self.intent if keep_intent else None, None)
            log.info("%s released%s", self.where, " (its intent kept for recover)" if keep_intent else "")
        except Exception as exc:  # noqa: BLE001 - the release's own outcome is what the caller must see
            log.error("%s: could not release it (%s); it expires by itself in %d s", self.where, exc, self.duration_s)

    def _replace(self, intent: Intent | None, holder: str | None) -> None:
        from kubernetes.client.exceptions import ApiException

        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            try:
                self._version = self._write(self._body(intent, holder, self._version))
            except ApiException as exc:
                if exc.status == 409:
                    self.lost = (f"{self.where} was taken over by someone else (not renewed within "
                                 f"{self.duration_s} s?); this release stops")
                    raise LeaseLost(self.lost) from exc
                raise LeaseError(f"{self.where}: cannot write it ({exc.status} {exc.reason})") from exc

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name=f"renew {self.name}", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.duration_s / 3):
            try:
                self._replace(self.intent, self.holder)
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - try again at the next beat; the Lease outlives a few misses
                log.warning("%s: renewing failed (%s); trying again in %.0f s", self.where, exc, self.duration_s / 3)
