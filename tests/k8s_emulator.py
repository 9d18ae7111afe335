"""An in-memory Kubernetes API (kmock's KubernetesEmulator) on 127.0.0.1, in a background thread.

No Kubernetes API server can run on these machines; this emulator serves discovery, create, get,
list, merge-patch and watch over real HTTP, so the real `kubernetes` client (and `kubectl`) talk to it.
It has no admission, no controllers and no `metadata.generation`: tests play the controller.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import yaml

ISVC = "serving.kserve.io/v1beta1/inferenceservices"


class KubernetesApiEmulator:
    def __init__(self, resources: tuple[str, ...] = (ISVC,)):
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
                kind = "InferenceService" if resource == ISVC else None
                handler.resources[resource] = kmock.ResourceInfo(
                    namespaced=True, kind=kind, singular=resource.rsplit("/", 1)[1].rstrip("s"),
                    verbs={"get", "list", "watch", "create", "patch", "update", "delete"}, shortnames={"isvc"})
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


def isvc_body(name: str, namespace: str, storage_uri: str) -> dict:
    """An InferenceService as deployed (see deployment/), Ready on `storage_uri` since an hour ago."""
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"predictor": {"minReplicas": 1, "model": {"modelFormat": {"name": "maskrcnn"}, "storageUri": storage_uri}}},
            "status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}]}}


class IsvcController:
    """Plays KServe's controller against the emulator: when the storageUri changes, report Ready (or never)."""

    def __init__(self, kubeconfig: str, name: str, namespace: str, becomes_ready: bool = True):
        from kubernetes import client, config

        self.api = client.CustomObjectsApi(config.new_client_from_config(config_file=kubeconfig))
        self.name, self.namespace, self.becomes_ready = name, namespace, becomes_ready
        self.seen: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def get(self) -> dict:
        return self.api.get_namespaced_custom_object("serving.kserve.io", "v1beta1", self.namespace, "inferenceservices", self.name)

    def create(self, storage_uri: str) -> dict:
        return self.api.create_namespaced_custom_object("serving.kserve.io", "v1beta1", self.namespace, "inferenceservices",
                                                        isvc_body(self.name, self.namespace, storage_uri))

    def _run(self) -> None:
        import time
        from datetime import UTC, datetime

        current = self.get()["spec"]["predictor"]["model"]["storageUri"]
        while not self._stop.is_set():
            uri = self.get()["spec"]["predictor"]["model"]["storageUri"]
            if uri != current:
                self.seen.append(uri)
                current = uri
                if self.becomes_ready:
                    time.sleep(1.1)  # a rollout takes time; and RFC 3339 times have whole seconds
                    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                    self.api.patch_namespaced_custom_object(
                        "serving.kserve.io", "v1beta1", self.namespace, "inferenceservices", self.name,
                        {"status": {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}})
            time.sleep(0.2)

    def __enter__(self) -> IsvcController:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(5)
