"""An in-memory Kubernetes API (kmock's KubernetesEmulator) on 127.0.0.1, in a background thread.

No Kubernetes API server can run on these machines; this emulator serves discovery, create, get,
list, merge-patch and watch over real HTTP, so the real `kubernetes` client (and `kubectl`) talk to it.
It has no admission, no controllers and no `metadata.generation`: tests play the controller
(`IsvcController`, which writes the status fields KServe writes).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import yaml

ISVC = "serving.kserve.io/v1beta1/inferenceservices"
DEPLOYMENTS = "apps/v1/deployments"
KINDS = {ISVC: ("InferenceService", {"isvc"}), DEPLOYMENTS: ("Deployment", {"deploy"})}
SOURCE_URI = "internal.serving.kserve.io/storage-initializer-sourceuri"


class KubernetesApiEmulator:
    def __init__(self, resources: tuple[str, ...] = (ISVC, DEPLOYMENTS)):
        self.resources = resources
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.port: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="k8s-emulator")

    async def _serve(self) -> None:
        import kmock

        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as handler, kmock.Server(handler) as server:
            for resource in self.resources:
                kind, short = KINDS[resource]
                handler.resources[resource] = kmock.ResourceInfo(
                    namespaced=True, kind=kind, singular=resource.rsplit("/", 1)[1].rstrip("s"),
                    verbs={"get", "list", "watch", "create", "patch", "update", "delete"}, shortnames=short)
            self.port = server.port
            self._ready.set()
            await self._stop.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by start()
            self.error = exc
            self._ready.set()

    def start(self) -> KubernetesApiEmulator:
        self.thread.start()
        if not self._ready.wait(30) or self.error is not None:
            raise RuntimeError(f"the Kubernetes API emulator did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}],
        }))
        return path


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def isvc_body(name: str, namespace: str, storage_uri: str, mode: str = "Knative") -> dict:
    """An InferenceService as deployed (see deployment/), serving `storage_uri` since an hour ago."""
    annotations = {"serving.kserve.io/deploymentMode": "Serverless" if mode == "Knative" else "RawDeployment"}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace, "generation": 1, "annotations": annotations},
            "spec": {"predictor": {"minReplicas": 1, "model": {"modelFormat": {"name": "maskrcnn"}, "storageUri": storage_uri}}},
            "status": {"deploymentMode": mode, "observedGeneration": 1,
                       "conditions": [{"type": t, "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}
                                      for t in ("PredictorReady", "Ready")]}}


class IsvcController:
    """Plays KServe's controller against the emulator, writing the status fields KServe itself writes
    (`pkg/apis/serving/v1beta1/inference_service_status.go`, read from KServe's source):

    - Knative mode (`PropagateStatus`): a storageUri change creates revision `<name>-predictor-0000N`;
      `components.predictor.latestCreatedRevision` names it at once, `latestReadyRevision` and `traffic`
      move to it when it is ready; `modelStatus.transitionStatus` goes InProgress -> UpToDate (or
      BlockedByFailedLoad with `lastFailureInfo`, while the old revision keeps serving); and
      `status.observedGeneration` is the Knative Service's generation, not the InferenceService's.
    - Standard mode (`PropagateRawStatus`): the predictor Deployment `<name>-predictor` gets the new URI in
      its pod template annotation and a new generation; its status catches up when the new pods are
      available (or Progressing=False, ProgressDeadlineExceeded); `status.observedGeneration` is the
      Deployment's.

    `reconcile_delay_s`: how long the status stays exactly as before the patch (KServe has not reconciled
    yet: the old revision still Ready, an unrelated observedGeneration); `becomes_ready=False`: the new
    model never loads.
    """

    def __init__(self, kubeconfig: str, name: str, namespace: str, becomes_ready: bool = True, mode: str = "Knative",
                 rollout_s: float = 1.1, reconcile_delay_s: float = 0.0):
        from kubernetes import client, config

        api_client = config.new_client_from_config(config_file=kubeconfig)
        self.api, self.apps = client.CustomObjectsApi(api_client), client.AppsV1Api(api_client)
        self.name, self.namespace, self.becomes_ready, self.mode = name, namespace, becomes_ready, mode
        self.rollout_s, self.reconcile_delay_s = rollout_s, reconcile_delay_s
        self.seen: list[str] = []
        self.errors: list[str] = []
        self.served: list[tuple[float, str]] = []  # (time.monotonic(), uri) whenever a model starts serving
        self.revision, self.ksvc_generation = 1, 7  # deliberately unrelated to the InferenceService's generation
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def predictor(self) -> str:
        return f"{self.name}-predictor"

    def rev(self, n: int) -> str:
        return f"{self.predictor}-{n:05d}"

    def get(self) -> dict:
        return self.api.get_namespaced_custom_object("serving.kserve.io", "v1beta1", self.namespace, "inferenceservices", self.name)

    def _status(self, status: dict) -> None:
        self.api.patch_namespaced_custom_object("serving.kserve.io", "v1beta1", self.namespace, "inferenceservices",
                                                self.name, {"status": status})

    def _ready(self, status: str, reason: str = "", message: str = "") -> list[dict]:
        return [{"type": t, "status": status, "reason": reason, "message": message, "lastTransitionTime": _now()}
                for t in ("PredictorReady", "Ready")]

    def create(self, storage_uri: str) -> dict:
        import time

        body = isvc_body(self.name, self.namespace, storage_uri, self.mode)
        if self.mode == "Knative":
            body["status"]["observedGeneration"] = self.ksvc_generation
            body["status"]["components"] = {"predictor": {
                "latestCreatedRevision": self.rev(1), "latestReadyRevision": self.rev(1), "latestRolledoutRevision": self.rev(1),
                "traffic": [{"revisionName": self.rev(1), "percent": 100, "latestRevision": True}]}}
            body["status"]["modelStatus"] = {"transitionStatus": "UpToDate",
                                             "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"}}
        else:
            self.apps.create_namespaced_deployment(self.namespace, self._deployment(storage_uri, generation=1, ready=True))
        self.served.append((time.monotonic(), storage_uri))
        return self.api.create_namespaced_custom_object("serving.kserve.io", "v1beta1", self.namespace,
                                                        "inferenceservices", body)

    def _deployment(self, uri: str, generation: int, ready: bool, failed: bool = False, observed: int | None = None) -> dict:
        conditions = [{"type": "Available", "status": "True" if ready else "False", "reason": "MinimumReplicasAvailable"}]
        if failed:
            conditions.append({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                               "message": f'ReplicaSet "{self.predictor}-2" has timed out progressing.'})
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": self.predictor, "namespace": self.namespace, "generation": generation},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": self.predictor}},
                         "template": {"metadata": {"labels": {"app": self.predictor}, "annotations": {SOURCE_URI: uri}},
                                      "spec": {"containers": [{"name": "kserve-container", "image": "maskrcnn-platform:0.1.0"}]}}},
                "status": {"observedGeneration": observed if observed is not None else generation,
                           "replicas": 1 if ready else 2, "updatedReplicas": 1 if ready else 0,
                           "availableReplicas": 1, "unavailableReplicas": 0 if ready else 1, "conditions": conditions}}

    def _rollout(self, uri: str) -> None:
        import time

        time.sleep(self.reconcile_delay_s)
        if self.mode == "Knative":
            old, self.revision, self.ksvc_generation = self.rev(self.revision), self.revision + 1, self.ksvc_generation + 1
            new = self.rev(self.revision)
            self._status({"observedGeneration": self.ksvc_generation, "conditions": self._ready("Unknown", "RevisionMissing"),
                          "components": {"predictor": {"latestCreatedRevision": new, "latestReadyRevision": old}},
                          "modelStatus": {"transitionStatus": "InProgress", "states": {"targetModelState": "Loading"}}})
            time.sleep(self.rollout_s)
            if not self.becomes_ready:
                self._status({"conditions": self._ready("False", "RevisionFailed", f"Revision {new} failed with message: "
                                                                                    "container exited with code 1"),
                              "modelStatus": {"transitionStatus": "BlockedByFailedLoad",
                                              "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "checksum mismatch"}}})
                return
            canary = self.get()["spec"]["predictor"].get("canaryTrafficPercent")
            predictor = self.get()["status"]["components"]["predictor"]
            traffic = [{"revisionName": new, "percent": 100 if canary is None else canary, "latestRevision": True}]
            if canary is not None and canary < 100:
                traffic.append({"revisionName": predictor.get("latestRolledoutRevision", old), "percent": 100 - canary,
                                "latestRevision": False})
            rolled = {"latestRolledoutRevision": new} if canary in (None, 100) else {}
            self.served.append((time.monotonic(), uri))  # the new pods serve before the controller reports it
            self._status({"conditions": self._ready("True"), "observedGeneration": self.ksvc_generation,
                          "components": {"predictor": {"latestReadyRevision": new, "traffic": traffic, **rolled}},
                          "modelStatus": {"transitionStatus": "UpToDate",
                                          "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"}}})
        else:
            current = self.apps.read_namespaced_deployment(self.predictor, self.namespace)
            generation = int(current.metadata.generation or 1) + 1
            self.apps.patch_namespaced_deployment(self.predictor, self.namespace,
                                                  self._deployment(uri, generation, ready=False, observed=generation - 1))
            time.sleep(self.rollout_s)
            done = self._deployment(uri, generation, ready=self.becomes_ready, failed=not self.becomes_ready)
            if self.becomes_ready:
                self.served.append((time.monotonic(), uri))  # the new pods serve before their Deployment reports it
            self.apps.patch_namespaced_deployment(self.predictor, self.namespace, done)
            self._status({"observedGeneration": generation,
                          "conditions": self._ready("True") if self.becomes_ready else
                          self._ready("False", "ProgressDeadlineExceeded", "ReplicaSet has timed out progressing.")})

    def _run(self) -> None:
        import time

        current = self._entered_uri
        while not self._stop.is_set():
            try:
                uri = self.get()["spec"]["predictor"]["model"]["storageUri"]
                if uri != current:
                    self.seen.append(uri)
                    current = uri
                    self._rollout(uri)
            except Exception as exc:  # noqa: BLE001 - a loaded machine's transient API error must not end the controller
                self.errors.append(repr(exc))
            time.sleep(0.1)

    def __enter__(self) -> IsvcController:
        # Read before the thread starts: a thread that first looked after the deploy step's patch (a loaded
        # machine) took the new URI for the old one and never rolled out.
        self._entered_uri = self.get()["spec"]["predictor"]["model"]["storageUri"]
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(10)
        if self.errors:  # shown beside whatever the test saw, so a flake names its cause
            print(f"IsvcController {self.name}: API errors while reconciling: {self.errors[:5]}")
