"""A stand-in for KServe's controller, acting on a real Kubernetes API server (`devstack.kubeapi`).

KServe's controller cannot run here (it needs Knative, or a kubelet for its Deployments), so the tests
play it: `IsvcController` watches one InferenceService through the API server and writes its status
through the status subresource, as KServe does, with the fields KServe writes. Everything else is the
real server's: `metadata.generation` bumps, resource versions, schema validation, RBAC.
"""

from __future__ import annotations

import threading

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
SOURCE_URI = "internal.serving.kserve.io/storage-initializer-sourceuri"


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def isvc_body(name: str, namespace: str, storage_uri: str, mode: str = "Knative") -> dict:
    """An InferenceService as deployed (see deployment/): its spec; the server sets its generation."""
    annotations = {"serving.kserve.io/deploymentMode": "Serverless" if mode == "Knative" else "RawDeployment"}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
            "spec": {"predictor": {"minReplicas": 1, "model": {"modelFormat": {"name": "maskrcnn"}, "storageUri": storage_uri}}}}


class IsvcController:
    """Plays KServe's controller for one InferenceService, writing the status fields KServe itself writes
    (`pkg/apis/serving/v1beta1/inference_service_status.go`, read from KServe's source):

    - Knative mode (`PropagateStatus`): a storageUri change creates revision `<name>-predictor-0000N`;
      `components.predictor.latestCreatedRevision` names it at once, `latestReadyRevision` and `traffic`
      move to it when it is ready; `modelStatus.transitionStatus` goes InProgress -> UpToDate (or
      BlockedByFailedLoad with `lastFailureInfo`, while the old revision keeps serving); and
      `status.observedGeneration` is the Knative Service's generation, not the InferenceService's.
    - Standard mode (`PropagateRawStatus`): the predictor Deployment `<name>-predictor` gets the new URI in
      its pod template annotation (the API server bumps its generation); its status catches up when the new
      pods are available (or Progressing=False, ProgressDeadlineExceeded); `status.observedGeneration` is
      the Deployment's.

    It watches the InferenceService (a real watch on the API server, resumed from the last resource
    version) and writes status only through the status subresource, as the admin. `reconcile_delay_s`:
    how long the status stays exactly as before the patch (KServe has not reconciled yet: the old revision
    still Ready, an unrelated observedGeneration); `becomes_ready=False`: the new model never loads.
    """

    def __init__(self, kubeconfig: str, name: str, namespace: str, becomes_ready: bool = True, mode: str = "Knative",
                 rollout_s: float = 1.1, reconcile_delay_s: float = 0.0, on_revision=None, on_traffic=None):
        from kubernetes import client, config

        api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.api, self.apps = client.CustomObjectsApi(api_client), client.AppsV1Api(api_client)
        self.name, self.namespace, self.becomes_ready, self.mode = name, namespace, becomes_ready, mode
        self.rollout_s, self.reconcile_delay_s = rollout_s, reconcile_delay_s
        # on_revision(revision, uri): called when a new revision's pods start (it returns once they are ready, as a
        # readiness probe would); on_traffic(traffic): called with the traffic split whenever it changes
        self.on_revision, self.on_traffic = on_revision, on_traffic
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
        return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)

    def _status(self, status: dict) -> None:
        self.api.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, self.name, {"status": status})

    def _ready(self, status: str, reason: str = "", message: str = "") -> list[dict]:
        # Knative's Condition has `reason,omitempty` and `message,omitempty`: an empty one is not written
        # (and the 1.20 API server reads an empty string in a merge patch of a custom resource as null)
        extra = {k: v for k, v in (("reason", reason), ("message", message)) if v}
        return [{"type": t, "status": status, **extra, "lastTransitionTime": _now()} for t in ("PredictorReady", "Ready")]

    def create(self, storage_uri: str) -> dict:
        """Create the InferenceService serving `storage_uri` and report it served (see `adopt`)."""
        created = self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                           isvc_body(self.name, self.namespace, storage_uri, self.mode))
        self.adopt()
        return created

    def adopt(self) -> None:
        """Report the InferenceService (created here or applied from an overlay) as KServe does once it serves
        its storageUri: in Standard mode, with its predictor Deployment, created here."""
        import time

        storage_uri = self.get()["spec"]["predictor"]["model"]["storageUri"]
        status = {"deploymentMode": self.mode, "observedGeneration": 1, "conditions": self._ready("True")}
        if self.mode == "Knative":
            status["observedGeneration"] = self.ksvc_generation
            status["components"] = {"predictor": {
                "latestCreatedRevision": self.rev(1), "latestReadyRevision": self.rev(1), "latestRolledoutRevision": self.rev(1),
                "traffic": [{"revisionName": self.rev(1), "percent": 100, "latestRevision": True}]}}
            status["modelStatus"] = {"transitionStatus": "UpToDate",
                                     "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"}}
        else:
            self.apps.create_namespaced_deployment(self.namespace, self._deployment(storage_uri))
            self._deployment_status(generation=1, ready=True)
        self._status(status)
        self.served.append((time.monotonic(), storage_uri))

    def _deployment(self, uri: str) -> dict:
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": self.predictor, "namespace": self.namespace},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": self.predictor}},
                         "template": {"metadata": {"labels": {"app": self.predictor}, "annotations": {SOURCE_URI: uri}},
                                      "spec": {"containers": [{"name": "kserve-container", "image": "maskrcnn-serving:0.1.0"}]}}}}

    def _deployment_status(self, generation: int, ready: bool, failed: bool = False, observed: int | None = None) -> None:
        """What Kubernetes' Deployment controller reports (written through the status subresource)."""
        conditions = [{"type": "Available", "status": "True" if ready else "False", "reason": "MinimumReplicasAvailable"}]
        if failed:
            conditions.append({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                               "message": f'ReplicaSet "{self.predictor}-2" has timed out progressing.'})
        status = {"observedGeneration": observed if observed is not None else generation,
                  "replicas": 1 if ready else 2, "updatedReplicas": 1 if ready else 0,
                  "readyReplicas": 1, "availableReplicas": 1, "unavailableReplicas": 0 if ready else 1, "conditions": conditions}
        self.apps.patch_namespaced_deployment_status(self.predictor, self.namespace, {"status": status})

    def _rollout(self, uri: str) -> None:
        import time

        if self._stop.wait(self.reconcile_delay_s):
            return
        if self.mode == "Knative":
            old, self.revision, self.ksvc_generation = self.rev(self.revision), self.revision + 1, self.ksvc_generation + 1
            new = self.rev(self.revision)
            self._status({"observedGeneration": self.ksvc_generation, "conditions": self._ready("Unknown", "RevisionMissing"),
                          "components": {"predictor": {"latestCreatedRevision": new, "latestReadyRevision": old}},
                          "modelStatus": {"transitionStatus": "InProgress", "states": {"targetModelState": "Loading"}}})
            if self._stop.wait(self.rollout_s):  # the test is over
                return
            if self.on_revision is not None and self.becomes_ready:
                self.on_revision(new, uri)
            if not self.becomes_ready:
                self._status({"conditions": self._ready("False", "RevisionFailed", f"Revision {new} failed with message: "
                                                                                    "container exited with code 1"),
                              "modelStatus": {"transitionStatus": "BlockedByFailedLoad",
                                              "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "checksum mismatch"}}})
                return
            current = self.get()
            canary = current["spec"]["predictor"].get("canaryTrafficPercent")
            predictor = current["status"]["components"]["predictor"]
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
            if self.on_traffic is not None:
                self.on_traffic(traffic)
        else:
            template = {"spec": {"template": {"metadata": {"annotations": {SOURCE_URI: uri}}}}}
            generation = int(self.apps.patch_namespaced_deployment(self.predictor, self.namespace, template).metadata.generation)
            self._deployment_status(generation, ready=False, observed=generation - 1)
            if self._stop.wait(self.rollout_s):  # the test is over
                return
            if self.becomes_ready:
                self.served.append((time.monotonic(), uri))  # the new pods serve before their Deployment reports it
            self._deployment_status(generation, ready=self.becomes_ready, failed=not self.becomes_ready)
            self._status({"observedGeneration": generation,
                          "conditions": self._ready("True") if self.becomes_ready else
                          self._ready("False", "ProgressDeadlineExceeded", "ReplicaSet has timed out progressing.")})

    def _retraffic(self, canary: int | None) -> None:
        """A change of canaryTrafficPercent alone: Knative moves the traffic, and creates no revision (the
        pod template is the same). At 100% (or none) the latest revision is the rolled-out one."""
        if self._stop.wait(self.rollout_s / 2):
            return
        predictor = self.get()["status"]["components"]["predictor"]
        latest, rolled = predictor["latestReadyRevision"], predictor.get("latestRolledoutRevision")
        traffic = [{"revisionName": latest, "percent": 100 if canary is None else canary, "latestRevision": True}]
        if canary is not None and canary < 100 and rolled and rolled != latest:
            traffic.append({"revisionName": rolled, "percent": 100 - canary, "latestRevision": False})
        self.ksvc_generation += 1
        self._status({"observedGeneration": self.ksvc_generation, "components": {"predictor": {
            "traffic": traffic, **({"latestRolledoutRevision": latest} if canary in (None, 100) else {})}}})
        if self.on_traffic is not None:
            self.on_traffic(traffic)

    def _run(self) -> None:
        import time

        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        current, version = self._entered_uri, self._entered_version
        canary = self._entered_canary
        while not self._stop.is_set():
            try:
                stream = watch.Watch().stream(self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                                              field_selector=f"metadata.name={self.name}", resource_version=version,
                                              timeout_seconds=1, _request_timeout=5)
                for event in stream:
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    uri = obj["spec"]["predictor"]["model"]["storageUri"]
                    wanted = obj["spec"]["predictor"].get("canaryTrafficPercent")
                    if uri != current:
                        self.seen.append(uri)
                        current, canary = uri, wanted
                        self._rollout(uri)
                    elif wanted != canary and self.mode == "Knative":
                        canary = wanted
                        self._retraffic(wanted)
                    if self._stop.is_set():
                        break
            except ApiException as exc:
                if exc.status == 410:  # the resource version is too old: start again from the object as it is
                    obj = self.get()
                    version = obj["metadata"]["resourceVersion"]
                else:
                    self.errors.append(repr(exc))
                    time.sleep(0.1)
            except Exception as exc:  # noqa: BLE001 - a loaded machine's transient API error must not end the controller
                self.errors.append(repr(exc))
                time.sleep(0.1)

    def __enter__(self) -> IsvcController:
        # Read before the thread starts: a thread that first looked after the deploy step's patch (a loaded
        # machine) took the new URI for the old one and never rolled out.
        obj = self.get()
        self._entered_uri, self._entered_version = obj["spec"]["predictor"]["model"]["storageUri"], obj["metadata"]["resourceVersion"]
        self._entered_canary = obj["spec"]["predictor"].get("canaryTrafficPercent")
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(10)
        if self.errors:  # shown beside whatever the test saw, so a flake names its cause
            print(f"IsvcController {self.name}: API errors while reconciling: {self.errors[:5]}")
