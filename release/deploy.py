"""Point a KServe InferenceService at a new model, wait until KServe serves it, roll back if it does not.

Uses the real `kubernetes` client: in a pod, the in-cluster ServiceAccount, elsewhere a kubeconfig; with
$MASKRCNN_PROMOTER_SERVICE_ACCOUNT, acting as that ServiceAccount through a short-lived token (RBAC: get and
patch on the one InferenceService, get on its predictor Deployment, its release Lease; see deployment/).

"Serving the new model" is read the way KServe reports it (`pkg/apis/serving/v1beta1/inference_service_status.go`),
never from `status.observedGeneration`: KServe copies that from the Knative Service or the Deployment,
whose generations have nothing to do with the InferenceService's own.

- Knative (Serverless) mode: `status.components.predictor.latestCreatedRevision` is a revision created
  after the patch, `latestReadyRevision` equals it, `Ready` is True, and the traffic entry of that
  revision (`latestRevision: true`) carries 100% (or the canary percent). `modelStatus.transitionStatus`
  BlockedByFailedLoad or InvalidSpec fails the rollout at once: Knative keeps the old revision serving.
- Standard (RawDeployment) mode: the predictor Deployment `<name>-predictor` has the new URI in its pod
  template (KServe's `internal.serving.kserve.io/storage-initializer-sourceuri` annotation), its rollout
  is complete (observed generation, updated and available replicas, no old pods), and `Ready` is True.
  `canaryTrafficPercent` needs Knative mode and is refused here before anything is patched.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

from maskrcnn.package import DIGEST_ANNOTATION, VERSION_ANNOTATION
from maskrcnn.waiting import WaitTimeout, connection_error, describe, poll_until, retry_call

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
SOURCE_URI_ANNOTATION = "internal.serving.kserve.io/storage-initializer-sourceuri"
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
FAILED_TRANSITIONS = ("BlockedByFailedLoad", "InvalidSpec")
SERVICE_ACCOUNT = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class DeployError(RuntimeError):
    """The InferenceService could not be updated, or did not become Ready (and was rolled back)."""


@dataclass(frozen=True)
class DeployResult:
    name: str
    namespace: str
    storage_uri: str
    previous_uri: str | None
    previous_canary: int | None = None  # the canaryTrafficPercent before this change (None: none set)


PROMOTER_ENV = "MASKRCNN_PROMOTER_SERVICE_ACCOUNT"
"""`namespace/name` of the ServiceAccount the release acts as (a short-lived TokenRequest token, minted with
the caller's own credentials, which may do nothing else: deployment/base/rbac-promote.yaml); unset: the
caller's own identity."""
TOKEN_SECONDS = 3600
_tokens: dict[tuple[str, str], tuple[float, str]] = {}
_tokens_lock = threading.Lock()


def custom_objects_api(kubeconfig: str = "") -> Any:
    """The Kubernetes API as the release's identity: `kubeconfig`, else the pod's in-cluster account, else
    ~/.kube/config; acting as $MASKRCNN_PROMOTER_SERVICE_ACCOUNT when it is set."""
    from kubernetes import client, config

    if kubeconfig:
        api_client = config.new_client_from_config(config_file=kubeconfig)
    else:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        api_client = client.ApiClient(configuration)
    acting = os.environ.get(PROMOTER_ENV, "")
    if acting:
        api_client = _acting_as(api_client, acting, kubeconfig)
    return client.CustomObjectsApi(api_client)


def _acting_as(api_client: Any, account: str, kubeconfig: str) -> Any:
    """An API client that authenticates as the ServiceAccount `account` (namespace/name) with a token the
    caller requests for it (TokenRequest, TOKEN_SECONDS), reused until a tenth of its life is left."""
    import copy
    import time

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    namespace, _, name = account.partition("/")
    if not (SERVICE_ACCOUNT.fullmatch(namespace) and SERVICE_ACCOUNT.fullmatch(name)):
        raise DeployError(f"${PROMOTER_ENV}={account!r}: expected namespace/name of a ServiceAccount")
    with _tokens_lock:
        expires, token = _tokens.get((kubeconfig, account), (0.0, ""))
        if time.monotonic() > expires:
            request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
                audiences=[], expiration_seconds=TOKEN_SECONDS))
            try:
                answer = retry_call(client.CoreV1Api(api_client).create_namespaced_service_account_token, name, namespace,
                                    request, what=f"requesting a token for {account}")
            except ApiException as exc:
                raise DeployError(f"cannot act as ServiceAccount {account} ({exc.status} {exc.reason}): the pipeline's "
                                  f"account needs `create` on its serviceaccounts/token (deployment/base/rbac-promote.yaml)")
            token = answer.status.token
            _tokens[(kubeconfig, account)] = (time.monotonic() + 0.9 * TOKEN_SECONDS, token)
            log.info("acting as ServiceAccount %s (a %d s token)", account, TOKEN_SECONDS)
    configuration = copy.copy(api_client.configuration)
    configuration.api_key = {"authorization": f"Bearer {token}"}
    configuration.api_key_prefix = {}
    configuration.refresh_api_key_hook = None
    configuration.cert_file = configuration.key_file = None  # the token alone says who this is
    return client.ApiClient(configuration)


def _predictor(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("spec", {}).get("predictor", {})


def storage_uri_of(obj: dict[str, Any]) -> str | None:
    return _predictor(obj).get("model", {}).get("storageUri")


def _condition(obj: dict[str, Any], kind: str = "Ready") -> dict[str, Any]:
    for cond in obj.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == kind:
            return cond
    return {}


def deployment_mode(obj: dict[str, Any]) -> str:
    """`Knative` or `Standard`, as KServe normalises them (Serverless and RawDeployment are their old names)."""
    mode = (obj.get("status", {}).get("deploymentMode")
            or obj.get("metadata", {}).get("annotations", {}).get(MODE_ANNOTATION, ""))
    mode = {"Serverless": "Knative", "RawDeployment": "Standard"}.get(mode, mode)
    if mode in ("Knative", "Standard"):
        return mode
    # not reconciled yet and no annotation: revisions only exist in Knative mode
    return "Knative" if obj.get("status", {}).get("components", {}).get("predictor", {}).get("latestCreatedRevision") else "Standard"


def _created_revision(obj: dict[str, Any]) -> str | None:
    return obj.get("status", {}).get("components", {}).get("predictor", {}).get("latestCreatedRevision")


def knative_progress(obj: dict[str, Any], revision_before: str | None, canary: int | None) -> tuple[str, str]:
    """("serving" | "waiting" | "failed", why) for a Knative-mode rollout started when `revision_before` was the
    predictor's latest created revision."""
    status = obj.get("status", {})
    predictor = status.get("components", {}).get("predictor", {})
    created, ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    if not created or created == revision_before:
        return "waiting", f"no new revision yet (latest created: {created})"
    model = status.get("modelStatus", {})
    if model.get("transitionStatus") in FAILED_TRANSITIONS:
        failure = model.get("lastFailureInfo", {})
        return "failed", (f"revision {created}: {model['transitionStatus']} ({failure.get('reason', '?')}: "
                          f"{failure.get('message', '')}); {ready or 'the previous revision'} keeps serving")
    if ready != created:
        return "waiting", f"revision {created} is not ready yet ({ready} serves)"
    if _condition(obj).get("status") != "True":
        return "waiting", f"Ready is {_condition(obj).get('status', 'absent')}: {_condition(obj).get('message', '')}"
    expected = canary if canary is not None else 100
    share = sum(int(t.get("percent") or 0) for t in predictor.get("traffic", []) or []
                if t.get("revisionName") == created and t.get("latestRevision"))
    if share != expected:
        return "waiting", f"revision {created} has {share}% of the traffic, expected {expected}%"
    return "serving", f"revision {created} is ready with {share}% of the traffic"


def standard_progress(obj: dict[str, Any], deployment: dict[str, Any] | None, uri: str) -> tuple[str, str]:
    """("serving" | "waiting" | "failed", why) for a Standard-mode rollout, from the predictor Deployment."""
    if deployment is None:
        return "waiting", "the predictor Deployment does not exist yet"
    template_uri = (deployment.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
                    .get(SOURCE_URI_ANNOTATION))
    if template_uri != uri:
        return "waiting", f"the Deployment still runs {template_uri}"
    meta, spec, st = deployment.get("metadata", {}), deployment.get("spec", {}), deployment.get("status", {})
    for cond in st.get("conditions", []) or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            return "failed", f"the Deployment's rollout stopped: {cond.get('reason')}: {cond.get('message', '')}"
    want = int(spec.get("replicas", 1))
    if int(st.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return "waiting", "the Deployment controller has not seen the new template yet"
    counts = {k: int(st.get(k) or 0) for k in ("replicas", "updatedReplicas", "availableReplicas", "unavailableReplicas")}
    if counts["updatedReplicas"] < want or counts["availableReplicas"] < want or counts["replicas"] > want \
            or counts["unavailableReplicas"]:
        return "waiting", f"rollout in progress: {counts}, want {want} updated and available"
    if _condition(obj).get("status") != "True":
        return "waiting", f"Ready is {_condition(obj).get('status', 'absent')}"
    return "serving", f"{want} replica(s) of the new template available"


RELEASE_ANNOTATIONS = (VERSION_ANNOTATION, DIGEST_ANNOTATION)


def release_annotations_of(obj: dict[str, Any]) -> dict[str, str | None]:
    """The release's annotations (the version and package digest the predictor must serve); None: absent."""
    annotations = obj.get("metadata", {}).get("annotations") or {}
    return {key: annotations.get(key) for key in RELEASE_ANNOTATIONS}


def read_service(name: str, namespace: str, *, api: Any = None,
                 kubeconfig: str = "") -> tuple[str | None, int | None, dict[str, str | None]]:
    """The InferenceService's storageUri, canaryTrafficPercent and release annotations now (DeployError
    when it cannot be read)."""
    from kubernetes.client.exceptions import ApiException

    api = api or custom_objects_api(kubeconfig)
    try:
        obj = _call(api.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        raise DeployError(f"InferenceService {namespace}/{name}: cannot read it ({exc.status} {exc.reason})") from exc
    return storage_uri_of(obj), canary_of(obj), release_annotations_of(obj)


def serving_revisions(name: str, namespace: str, *, api: Any = None, kubeconfig: str = "") -> dict[str, str]:
    """{"canary": the latest revision, "stable": the one beside it} as KServe reports a canary's traffic split
    (Knative mode); {} when there is no split to read."""
    api = api or custom_objects_api(kubeconfig)
    obj = _call(api.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
    traffic = obj.get("status", {}).get("components", {}).get("predictor", {}).get("traffic", []) or []
    latest = [t["revisionName"] for t in traffic if t.get("latestRevision") and t.get("revisionName")]
    others = [t["revisionName"] for t in traffic if not t.get("latestRevision") and t.get("revisionName")]
    return {"canary": latest[0], "stable": others[0]} if len(latest) == 1 and len(others) == 1 else {}


def canary_of(obj: dict[str, Any]) -> int | None:
    return _predictor(obj).get("canaryTrafficPercent")


def _patch(api: Any, name: str, namespace: str, uri: str | None, canary: int | None, set_canary: bool,
           resource_version: str = "", annotations: dict[str, str | None] | None = None) -> dict[str, Any]:
    predictor: dict[str, Any] = {"model": {"storageUri": uri}}
    if set_canary:
        predictor["canaryTrafficPercent"] = canary  # None removes it (merge patch)
    body: dict[str, Any] = {"spec": {"predictor": predictor}}
    metadata: dict[str, Any] = {}
    if resource_version:  # a precondition: the API server answers 409 Conflict if the object changed since
        metadata["resourceVersion"] = resource_version
    if annotations:  # the release's promise to the predictor, in the same write as the URI (None removes one)
        metadata["annotations"] = annotations
    if metadata:
        body["metadata"] = metadata
    return api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body)


def conditional_patch(api: Any, name: str, namespace: str, *, expect_uri: str | None, uri: str | None,
                      canary: int | None, set_canary: bool, obj: dict[str, Any] | None = None,
                      expect_canary: Any = ..., annotations: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Patch the storageUri (and canary) only while the spec still holds `expect_uri` (and `expect_canary`,
    when given): each patch carries the resourceVersion it was read at, so a concurrent writer makes it
    fail with 409 instead of being overwritten. A conflict caused by a status write (KServe's controller)
    is read again and retried while the spec is unchanged; _ChangedElsewhere when someone else changed it."""
    from kubernetes.client.exceptions import ApiException

    for _ in range(5):
        if obj is None:
            obj = _call(api.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
        if storage_uri_of(obj) != expect_uri or (expect_canary is not ... and canary_of(obj) != expect_canary):
            raise _ChangedElsewhere(f"InferenceService {namespace}/{name}: storageUri is {storage_uri_of(obj)} "
                                    f"(canary {canary_of(obj)}), not {expect_uri} as expected: someone else changed it; "
                                    f"theirs stands")
        try:
            return _call(_patch, api, name, namespace, uri, canary, set_canary, obj["metadata"]["resourceVersion"],
                         annotations)
        except ApiException as exc:
            if exc.status != 409:
                raise
            log.info("InferenceService %s/%s changed between read and patch (409); reading it again", namespace, name)
            obj = None
    raise DeployError(f"InferenceService {namespace}/{name}: it kept changing between read and patch (5 conflicts); "
                      f"nothing was patched")


def restore_storage_uri(name: str, namespace: str, *, expect_uri: str, uri: str | None, canary: int | None,
                        annotations: dict[str, str | None] | None = None, wait: bool = True, timeout: float = 600,
                        poll: float = 2.0, api: Any = None, kubeconfig: str = "") -> str:
    """Undo a change this release made: put back `uri` (and `canary`, None: all the traffic) if the service
    still points at `expect_uri`; leave it alone if it points elsewhere (someone else's change stands).
    With `wait`, wait until KServe serves it again (a failure to is reported, never rolled forward).
    Returns what was done, for the version's `promotion.failed` tag."""
    from kubernetes.client.exceptions import ApiException

    api = api or custom_objects_api(kubeconfig)
    obj = _call(api.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
    if storage_uri_of(obj) == uri and canary_of(obj) == canary and (annotations is None
                                                                  or release_annotations_of(obj) == annotations):
        return f"storageUri back on {uri} (already restored)"
    mode = deployment_mode(obj)
    revision = _created_revision(obj) if storage_uri_of(obj) != uri else None
    try:
        conditional_patch(api, name, namespace, expect_uri=expect_uri, uri=uri, canary=canary,
                          set_canary=canary is not None or canary_of(obj) is not None, obj=obj, annotations=annotations)
    except _ChangedElsewhere as exc:
        return f"storageUri not rolled back: {exc}"
    except ApiException as exc:
        raise DeployError(f"InferenceService {namespace}/{name}: restoring {uri} refused ({exc.status} {exc.reason})") from exc
    done = f"storageUri rolled back to {uri}"
    if not wait:
        return done + " (not awaited)"
    apps = _apps_api(api) if mode == "Standard" else None
    try:
        _wait_serving(api, apps, name, namespace, mode, uri, revision, canary, timeout, poll)
    except Exception as exc:  # noqa: BLE001 - the spec is restored; say what KServe did not confirm
        return done + f", but KServe did not report it serving: {describe(exc)}"
    return done


def _apps_api(custom_api: Any) -> Any:
    from kubernetes import client

    return client.AppsV1Api(custom_api.api_client)


def _read_deployment(apps: Any, name: str, namespace: str) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return apps.api_client.sanitize_for_serialization(apps.read_namespaced_deployment(f"{name}-predictor", namespace))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def update_storage_uri(name: str, namespace: str, uri: str, *, canary_percent: int | None = None,
                       clear_canary: bool = False, timeout: float = 600, poll: float = 2.0, api: Any = None,
                       kubeconfig: str = "", annotations: dict[str, str | None] | None = None) -> DeployResult:
    """Patch `spec.predictor.model.storageUri` (and `canaryTrafficPercent` when given; `clear_canary`
    removes it, so that the latest revision gets all the traffic), wait until KServe serves the new model
    (see the module's docstring), and restore the previous URI (and canary setting) if it does not within
    `timeout` seconds, fails, or the wait itself fails. With the URI unchanged and only the canary setting
    changing (a canary promoted to 100%), KServe creates no revision: it waits for the traffic to move.

    Transient API errors (connection failures, 429, 5xx) are retried (`maskrcnn.waiting`); any other error
    while waiting rolls back and raises DeployError. When the URI is already set, nothing is patched, but it
    still waits until KServe serves it (and raises DeployError, with nothing to roll back, if it does not).
    `annotations`: the release's annotations (RELEASE_ANNOTATIONS), written in the same patch and restored
    with the URI on a rollback."""
    from kubernetes.client.exceptions import ApiException

    api = api or custom_objects_api(kubeconfig)
    try:
        before = _call(api.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        raise DeployError(f"InferenceService {namespace}/{name}: cannot read it ({exc.status} {exc.reason})") from exc
    if "model" not in _predictor(before):
        raise DeployError(f"InferenceService {namespace}/{name}: spec.predictor.model is missing; this step patches "
                          f"spec.predictor.model.storageUri")
    mode = deployment_mode(before)
    if canary_percent is not None and mode != "Knative":
        raise DeployError(f"InferenceService {namespace}/{name} runs in {mode} mode: canaryTrafficPercent needs "
                          f"KServe's Knative (Serverless) mode; nothing was changed")
    previous_uri = storage_uri_of(before)
    previous_canary = canary_of(before)
    previous_annotations = release_annotations_of(before)
    annotations = {**previous_annotations, **annotations} if annotations else None
    set_canary = canary_percent is not None or (clear_canary and previous_canary is not None)
    canary = canary_percent if set_canary else previous_canary  # what the InferenceService asks for once patched
    apps = _apps_api(api) if mode == "Standard" else None
    if previous_uri == uri and previous_canary == canary and annotations in (None, previous_annotations):
        log.info("InferenceService %s/%s already points at %s; waiting until KServe serves it", namespace, name, uri)
        try:
            why = _wait_serving(api, apps, name, namespace, mode, uri, None, canary, timeout, poll)
        except Exception as exc:
            raise DeployError(f"InferenceService {namespace}/{name} already points at {uri}, but KServe does not "
                              f"serve it: {exc}") from exc
        log.info("InferenceService %s/%s serves %s: %s", namespace, name, uri, why)
        return DeployResult(name, namespace, uri, previous_uri, previous_canary)
    # a new URI makes a new revision; a new traffic split alone moves the traffic of the latest one
    revision_before = _created_revision(before) if previous_uri != uri else None
    try:
        patched = conditional_patch(api, name, namespace, expect_uri=previous_uri, expect_canary=previous_canary,
                                    uri=uri, canary=canary, set_canary=set_canary, obj=before, annotations=annotations)
    except _ChangedElsewhere as exc:
        raise DeployError(f"{exc}; nothing was patched") from None
    except ApiException as exc:
        raise DeployError(f"InferenceService {namespace}/{name}: patch refused ({exc.status} {exc.reason})") from exc
    log.info("InferenceService %s/%s (%s mode): storageUri %s -> %s%s; waiting up to %.0f s for it to serve", namespace,
             name, mode, previous_uri, uri, f" (canary {canary}%)" if canary is not None else " (all traffic)", timeout)
    try:
        why = _wait_serving(api, apps, name, namespace, mode, uri, revision_before, canary, timeout, poll)
    except _ChangedElsewhere as exc:
        raise DeployError(str(exc)) from None
    except BaseException as exc:  # whatever ends the wait: restore what was served, then say why
        try:  # only what this step set: a storageUri someone else wrote meanwhile stands
            conditional_patch(api, name, namespace, expect_uri=uri, uri=previous_uri, canary=previous_canary,
                              set_canary=set_canary, obj=patched,
                              annotations=previous_annotations if annotations else None)
        except Exception as undo:
            if not isinstance(exc, Exception):  # a signal: the caller's unwind tries again from the intent
                log.error("InferenceService %s/%s: rolling back to %s after %s failed: %s", namespace, name,
                          previous_uri, type(exc).__name__, describe(undo))
                raise exc from None
            if isinstance(undo, _ChangedElsewhere):
                raise DeployError(f"InferenceService {namespace}/{name}: {_reason(exc, uri, timeout)}; not rolled "
                                  f"back: {undo}") from exc
            raise DeployError(f"InferenceService {namespace}/{name}: {_reason(exc, uri, timeout)}; rolling back to "
                              f"{previous_uri} FAILED too ({describe(undo)}): restore it by hand") from exc
        if not isinstance(exc, Exception):
            raise  # a signal (release.interrupt) and the like: rolled back, and still stopping
        raise DeployError(f"InferenceService {namespace}/{name} {_reason(exc, uri, timeout)}; rolled back to "
                          f"{previous_uri}") from exc
    log.info("InferenceService %s/%s serves %s: %s", namespace, name, uri, why)
    return DeployResult(name, namespace, uri, previous_uri, previous_canary)


class _ChangedElsewhere(RuntimeError):
    """Someone else changed the storageUri while this step waited: theirs stands, nothing is rolled back."""


class _RolloutFailed(RuntimeError):
    """KServe reported the rollout failed (failed load, stuck Deployment)."""


def _reason(exc: BaseException, uri: str, timeout: float) -> str:
    if isinstance(exc, _RolloutFailed):
        return f"failed on {uri} ({exc})"
    if isinstance(exc, WaitTimeout):
        return f"was not serving within {timeout:.0f} s on {uri} ({exc.seen})"
    return f"could not be watched while it rolled out {uri} ({describe(exc)})"


def _call(func: Any, *args: Any) -> Any:
    """One Kubernetes API call, retried while its error is transient (connection errors, 429, 5xx)."""
    return retry_call(func, *args, what=f"Kubernetes API {getattr(func, '__name__', 'call')}")


def _wait_serving(api: Any, apps: Any, name: str, namespace: str, mode: str, uri: str, revision_before: str | None,
                  canary: int | None, timeout: float, poll: float) -> str:
    """Poll until KServe serves `uri` (returns why it says so); _RolloutFailed, _ChangedElsewhere or
    WaitTimeout otherwise. Transient API errors are polled through."""
    seen = {"why": ""}

    def check() -> str | None:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        if storage_uri_of(obj) != uri:
            raise _ChangedElsewhere(f"InferenceService {namespace}/{name}: storageUri changed to {storage_uri_of(obj)} "
                                    f"by someone else while waiting; not rolling back")
        if mode == "Knative":
            state, why = knative_progress(obj, revision_before, canary)
        else:
            state, why = standard_progress(obj, _read_deployment(apps, name, namespace), uri)
        seen["why"] = why
        if state == "failed":
            raise _RolloutFailed(why)
        return why if state == "serving" else None

    return poll_until(check, timeout=timeout, interval=poll, what=f"InferenceService {namespace}/{name} serving {uri}",
                      transient=connection_error, last=lambda: seen["why"])
