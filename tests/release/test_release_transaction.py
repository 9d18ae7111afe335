"""The release path as a transaction (`release.promote`, `release.lease`, `release.interrupt`): whatever
happens (a second release at the same moment, SIGTERM at each wait, a process killed outright, a
leftover canary split, an alias that cannot be moved), it ends in one of the two promised states (the
new version served to all the traffic and champion moved; or the previous URI served and the version
tagged `promotion.failed`), or it is refused before anything changes.

Real parts: the MLflow stack (PostgreSQL, Ceph's S3 gateway), a real Kubernetes API server (RBAC: the
release acts as the promote step's ServiceAccount), a real Prometheus, and the release's own CLI and KFP
step in their own processes for the signals. KServe's controller cannot run here: `kserve_stand_in`
plays it on the real API server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kserve_stand_in import IsvcController
from mlflow.tracking import MlflowClient
from helpers import logged_run

from release.deploy import release_annotations_of
from release.lease import ReleaseInFlight, ReleaseLease
from release.promote import promised
from maskrcnn.package import open_package

pytestmark = pytest.mark.slow

ISVC = "maskrcnn"
ROOT = Path(__file__).resolve().parents[2]


class Release:
    """One test's release world: a registered-model name, a bucket prefix, the InferenceService's stand-in."""

    def __init__(self, mlflow_stack, k8s, tmp_path: Path, label: str, **controller):
        self.stack, self.k8s, self.tmp = mlflow_stack, k8s, tmp_path
        self.client = MlflowClient(mlflow_stack.tracking_uri)
        self.name = f"{label}-{time.time_ns()}"
        self.prefix = f"s3://{mlflow_stack.state.models_bucket}/{label}"
        self.ctl = IsvcController(k8s.admin, ISVC, k8s.namespace, **controller)
        self.ctl.create(f"{self.prefix}/previous")
        self.common = dict(tracking_uri=mlflow_stack.tracking_uri, model_name=self.name, storage_prefix=self.prefix,
                           isvc_name=ISVC, namespace=k8s.namespace, ready_timeout=60, kubeconfig=k8s.kubeconfig)

    def run(self, serving_package: Path, label: str) -> tuple[str, Path, str]:
        """A training run that logged the package: (run id, its folder, its logged model's URI)."""
        folder = shutil.copytree(serving_package, self.tmp / label)
        run_id = logged_run(self.client, self.name, folder)
        models = self.client.search_logged_models([self.client.get_run(run_id).info.experiment_id],
                                                  filter_string=f"source_run_id = '{run_id}'")
        return run_id, folder, f"models:/{models[0].model_id}"

    def spec(self) -> dict:
        return self.ctl.get()["spec"]["predictor"]

    def annotations(self) -> dict:
        return release_annotations_of(self.ctl.get())

    def uri(self, version: str) -> str:
        return f"{self.prefix}/{self.name}/v{version}"

    def lease(self) -> ReleaseLease:
        return ReleaseLease(ISVC, self.k8s.namespace, kubeconfig=self.k8s.admin)

    def wait_for(self, what: str, check, timeout: float = 240, proc: subprocess.Popen | None = None, log: Path | None = None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the release exited with {proc.returncode} before {what}:\n"
                                     f"{log.read_text()[-3000:] if log else ''}")
            time.sleep(0.2)
        raise AssertionError(f"not within {timeout} s: {what}")

    def phase(self) -> str | None:
        state = self.lease().read()
        return state.intent.phase if state is not None and state.intent is not None else None

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.stack.env(), "MLFLOW_TRACKING_URI": self.stack.tracking_uri,
                "PYTHONPATH": str(ROOT)}

    def assert_rolled_back(self, version: str, *reason: str) -> None:
        """The second promised state: the previous URI served to all the traffic, the version tagged with
        why, the champion not moved to it, and the Lease free with no intent left."""
        assert self.spec()["model"]["storageUri"] == f"{self.prefix}/previous"
        assert "canaryTrafficPercent" not in self.spec()
        failed = self.client.get_model_version(self.name, version).tags["promotion.failed"]
        for part in reason:
            assert part in failed, failed
        champion = (self.client.get_registered_model(self.name).aliases or {}).get("champion")
        assert champion != version
        state = self.lease().read()
        assert state.holder is None and state.intent is None, state


@pytest.fixture
def world(mlflow_stack, k8s, tmp_path, monkeypatch):
    for key, value in mlflow_stack.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_stack.tracking_uri)
    return lambda label, **controller: Release(mlflow_stack, k8s, tmp_path, label, **controller)


def test_one_release_at_a_time_the_second_is_refused_before_it_changes_anything_kserve_stand_in(world, serving_package):
    """A promotes while its new revision takes 4 s to be ready; B's promote and a rollback, started meanwhile,
    are refused naming A, with nothing registered, published or patched. Once A is done, B goes through."""
    from release.promote import promote, rollback

    rel = world("race", rollout_s=4)
    _, folder_a, model_a = rel.run(serving_package, "a")
    _, folder_b, model_b = rel.run(serving_package, "b")
    outcome: dict = {}
    with rel.ctl:
        a = threading.Thread(target=lambda: outcome.update(a=promote(package_dir=folder_a, model_uri=model_a, **rel.common)))
        a.start()
        rel.wait_for("A patches the service", lambda: rel.phase() == "deploying" and rel.spec()["model"]["storageUri"] == rel.uri("1"))
        with pytest.raises(ReleaseInFlight, match=rf"promote of {rel.name} v1 by .* is in flight"):
            promote(package_dir=folder_b, model_uri=model_b, **rel.common)
        with pytest.raises(ReleaseInFlight, match="is in flight"):
            rollback(version="1", reason="a human, at the same moment", **{k: v for k, v in rel.common.items()
                                                                           if k != "storage_prefix"})
        assert [v.version for v in rel.client.search_model_versions(f"name = '{rel.name}'")] == ["1"]
        a.join(120)
        assert outcome["a"].version == "1" and rel.spec()["model"]["storageUri"] == rel.uri("1")
        second = promote(package_dir=folder_b, model_uri=model_b, **rel.common)
    assert second.version == "2" and rel.spec()["model"]["storageUri"] == rel.uri("2")
    assert rel.client.get_model_version_by_alias(rel.name, "champion").version == "2"
    # the promise to the predictor, written with the URI: the version and the published package's digest
    published = open_package(second.storage_uri, cache_dir=rel.tmp / "cache")
    tags = rel.client.get_model_version(rel.name, "2").tags
    assert rel.annotations() == promised("2", published.digest) and tags["serving.package_digest"] == published.digest
    assert tags["gate.scored_digest"] == open_package(folder_b).digest != published.digest  # stamped after scoring
    assert rel.ctl.seen == [rel.uri("1"), rel.uri("2")]  # B never touched the service while A held it
    intent = json.loads(rel.client.get_model_version(rel.name, "2").tags["promotion.intent"])
    assert intent["previous_uri"] == rel.uri("1") and intent["storage_uri"] == rel.uri("2") and intent["phase"] == "deploying"
    assert rel.lease().read().intent is None


def test_sigterm_while_waiting_for_readiness_unwinds_the_cli_kserve_stand_in(world, serving_package, tmp_path):
    """`release promote` gets SIGTERM (a cancelled run, a drain) while KServe rolls the new revision out: it
    puts the previous URI back, tags the version with the signal and the phase, frees the Lease, exits 143."""
    rel = world("sigterm-ready", rollout_s=600)  # the new revision never gets ready while the test looks
    run_id, _, _ = rel.run(serving_package, "a")
    log = tmp_path / "promote.log"
    with open(log, "wb") as out, rel.ctl:
        proc = subprocess.Popen([sys.executable, "-m", "release", "--model-name", rel.name, "--isvc-name", ISVC,
                                 "--namespace", rel.k8s.namespace, "--kubeconfig", rel.k8s.kubeconfig, "--ready-timeout",
                                 "600", "promote", run_id, "--storage-prefix", rel.prefix, "--min-segm-map", "0",
                                 "--min-mask-iou", "0"], env=rel.env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            rel.wait_for("the storageUri patched", lambda: rel.spec()["model"]["storageUri"] == rel.uri("1"), proc=proc,
                         log=log)
            time.sleep(1)  # well inside the readiness wait
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 143, log.read_text()[-3000:]
        finally:
            proc.kill()
    # the deploy step's own rollback put it back first; the unwind finds it so (either says the URI)
    rel.assert_rolled_back("1", "interrupted by SIGTERM in the deploying phase", f"back on {rel.prefix}/previous")
    assert "SIGTERM received: unwinding the release" in log.read_text()


def test_sigterm_while_the_canary_is_judged_unwinds_the_kfp_step_kserve_stand_in(world, serving_package, tmp_path):
    """The pipeline's promote step (the function KFP runs, in its own process) gets SIGTERM while the canary
    is judged against a real Prometheus: the canary split and its URI are undone, the version tagged."""
    from devstack import monitoring
    from release.promote import promote

    rel = world("sigterm-canary", rollout_s=0.5)
    _, folder_1, model_1 = rel.run(serving_package, "v1")
    _, folder_2, model_2 = rel.run(serving_package, "v2")
    mon = monitoring.start(tmp_path / "prometheus", [], [])
    log = tmp_path / "step.log"
    step = f"""
import json, sys
from kfp.dsl import Metrics, Model
from pipelines.components import promote
promote(model=Model(uri={str(folder_2)!r}), model_uri={model_2!r}, tracking_uri={rel.stack.tracking_uri!r},
        model_name={rel.name!r}, reason="gate", evidence={{}}, storage_prefix={rel.prefix!r}, isvc_name={ISVC!r},
        namespace={rel.k8s.namespace!r}, canary_percent=25, ready_timeout=60.0, kubeconfig={rel.k8s.kubeconfig!r},
        prometheus_url={mon.prometheus_url!r}, prometheus_selector="",
        canary_bounds={{"min_requests": 1000, "timeout_s": 900, "min_duration_s": 1, "interval_s": 1}},
        metrics=Metrics(uri={str(tmp_path / 'metrics')!r}))
"""
    try:
        with rel.ctl:
            promote(package_dir=folder_1, model_uri=model_1, **rel.common)  # the champion the canary is judged against
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-c", step], env=rel.env(), stdout=out, stderr=subprocess.STDOUT)
            try:
                rel.wait_for("the canary judged", lambda: rel.phase() == "canary", proc=proc, log=log)
                assert rel.spec()["canaryTrafficPercent"] == 25 and rel.spec()["model"]["storageUri"] == rel.uri("2")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(60) != 0
            finally:
                proc.kill()
    finally:
        mon.stop()
    assert "Interrupted: interrupted by SIGTERM" in log.read_text()
    assert rel.spec()["model"]["storageUri"] == rel.uri("1") and "canaryTrafficPercent" not in rel.spec()
    failed = rel.client.get_model_version(rel.name, "2").tags["promotion.failed"]
    assert "interrupted by SIGTERM in the canary phase" in failed and f"rolled back to {rel.uri('1')}" in failed
    assert rel.client.get_model_version_by_alias(rel.name, "champion").version == "1"
    assert rel.lease().read().intent is None


def test_a_killed_release_is_refused_until_recover_undoes_it_kserve_stand_in(world, serving_package, tmp_path):
    """SIGKILL (nothing can unwind) during the readiness wait: while the Lease is still live, a rollback is
    refused as in flight (exit 5); once it expires, as interrupted, naming `recover`; `release recover`
    puts the previous URI back from the intent and tags the version; then releases run again."""
    from release.__main__ import IN_FLIGHT, main

    rel = world("killed", rollout_s=600)
    run_id, folder, model_uri = rel.run(serving_package, "a")
    flags = ["--model-name", rel.name, "--isvc-name", ISVC, "--namespace", rel.k8s.namespace, "--kubeconfig",
             rel.k8s.kubeconfig, "--lease-seconds", "4"]
    log = tmp_path / "promote.log"
    with open(log, "wb") as out, rel.ctl:
        proc = subprocess.Popen([sys.executable, "-m", "release", *flags, "--ready-timeout", "600", "promote", run_id,
                                 "--storage-prefix", rel.prefix, "--min-segm-map", "0", "--min-mask-iou", "0"],
                                env=rel.env(), stdout=out, stderr=subprocess.STDOUT)
        rel.wait_for("the storageUri patched", lambda: rel.spec()["model"]["storageUri"] == rel.uri("1"), proc=proc, log=log)
        proc.kill()
        proc.wait(10)
    # KServe's controller carries on (here: restarted, now quick), from the revision it had reached
    ctl = IsvcController(rel.k8s.admin, ISVC, rel.k8s.namespace, rollout_s=0.5)
    ctl.revision, ctl.ksvc_generation = rel.ctl.revision, rel.ctl.ksvc_generation
    with ctl:
        assert main([*flags, "rollback", "1"]) == IN_FLIGHT  # its Lease is still live: nothing changed
        assert rel.spec()["model"]["storageUri"] == rel.uri("1")
        rel.wait_for("the Lease expires", lambda: not rel.lease().read().live, timeout=30)
        with pytest.raises(ReleaseInFlight, match=r"interrupted promote of .* v1 .*phase deploying.*release recover"):
            from release.promote import promote

            promote(package_dir=folder, model_uri=model_uri, **rel.common)
        assert main([*flags, "recover"]) == 0
        rel.assert_rolled_back("1", "interrupted in the deploying phase", "undone by release recover",
                               f"storageUri rolled back to {rel.prefix}/previous")
        assert rel.annotations() == {k: None for k in rel.annotations()}  # the promise went with the URI
        assert main([*flags, "recover"]) == 0  # nothing left: says so, changes nothing
        assert main([*flags, "rollback", "1"]) == 0  # releases run again (v1 was published before the kill)
    assert rel.spec()["model"]["storageUri"] == rel.uri("1")
    assert rel.client.get_model_version_by_alias(rel.name, "champion").version == "1"


def test_recover_finishes_a_release_killed_after_the_new_version_served_all_the_traffic_kserve_stand_in(world):
    """The intent a release killed between its last readiness wait and the champion's move leaves behind
    (phase `serving`, the service on the new URI): recover finishes it by moving the champion."""
    from release.lease import Intent
    from release.promote import STORAGE_URI_TAG, recover

    rel = world("finish")
    rel.client.create_registered_model(rel.name)
    version = rel.client.create_model_version(rel.name, f"{rel.prefix}/source")
    rel.client.set_model_version_tag(rel.name, version.version, STORAGE_URI_TAG, rel.uri(version.version))
    with rel.ctl:
        from release.deploy import update_storage_uri

        update_storage_uri(ISVC, rel.k8s.namespace, rel.uri(version.version), timeout=30, kubeconfig=rel.k8s.kubeconfig)
        lease = ReleaseLease(ISVC, rel.k8s.namespace, kubeconfig=rel.k8s.kubeconfig, duration_s=3)
        intent = Intent("promote", rel.name, ISVC, rel.k8s.namespace, lease.holder, phase="serving",
                        version=version.version, storage_uri=rel.uri(version.version),
                        previous_uri=f"{rel.prefix}/previous")
        lease.acquire(intent)
        lease._stop.set()  # the process dies here: nobody renews or releases the Lease
        rel.wait_for("the Lease expires", lambda: not rel.lease().read().live, timeout=30)
        outcome = recover(tracking_uri=rel.stack.tracking_uri, isvc_name=ISVC, namespace=rel.k8s.namespace,
                          kubeconfig=rel.k8s.kubeconfig)
    assert outcome.startswith(f"finished: {rel.name} v{version.version} is the champion")
    assert rel.client.get_model_version_by_alias(rel.name, "champion").version == version.version
    assert rel.spec()["model"]["storageUri"] == rel.uri(version.version) and rel.lease().read().intent is None


def test_a_plain_promote_clears_a_leftover_canary_split_kserve_stand_in(world, serving_package):
    """A canaryTrafficPercent left on the service (a canary overlay applied by hand, an old release): a
    promote without a canary sends all the traffic to the new version, the version the champion names."""
    from release.promote import promote

    rel = world("leftover")
    _, folder, model_uri = rel.run(serving_package, "a")
    rel.ctl.api.patch_namespaced_custom_object("serving.kserve.io", "v1beta1", rel.k8s.namespace, "inferenceservices", ISVC,
                                               {"spec": {"predictor": {"canaryTrafficPercent": 10}}})
    with rel.ctl:
        from release.deploy import DeployError

        # not the package the gate scored (the evaluate step's digest): refused before anything is registered
        with pytest.raises(DeployError, match="is not the sha256:0+ the gate scored"):
            promote(package_dir=folder, model_uri=model_uri, scored_digest="sha256:" + "0" * 64, **rel.common)
        assert rel.client.search_model_versions(f"name = '{rel.name}'") == []
        result = promote(package_dir=folder, model_uri=model_uri, scored_digest=open_package(folder).digest, **rel.common)
    assert "canaryTrafficPercent" not in rel.spec() and rel.spec()["model"]["storageUri"] == result.storage_uri
    traffic = rel.ctl.get()["status"]["components"]["predictor"]["traffic"]
    assert [(t["percent"], t["latestRevision"]) for t in traffic] == [(100, True)]
    assert rel.client.get_model_version_by_alias(rel.name, "champion").version == result.version


def test_rollback_whose_alias_cannot_move_puts_the_service_back_kserve_stand_in(world, serving_package, monkeypatch):
    """MLflow answers every alias move with a connection error (after the retries): the rollback puts the
    InferenceService back on what it served, so service and champion still agree."""
    from release import promote as release_promote
    from release.deploy import DeployError
    from release.promote import promote, rollback

    rel = world("rollback-alias")
    _, folder_a, model_a = rel.run(serving_package, "a")
    _, folder_b, model_b = rel.run(serving_package, "b")
    with rel.ctl:
        promote(package_dir=folder_a, model_uri=model_a, **rel.common)
        promote(package_dir=folder_b, model_uri=model_b, **rel.common)

        def unavailable(*args, **kwargs):
            raise ConnectionError("MLflow: 503 Service Unavailable")

        served_v2 = rel.annotations()
        assert served_v2["release.maskrcnn.io/model-version"] == "2"
        monkeypatch.setattr(release_promote, "set_alias", unavailable)
        with pytest.raises(DeployError, match=rf"rollback to {rel.name} v1: ConnectionError.*storageUri rolled back to "
                                              rf"{rel.uri('2')}"):
            rollback(version="1", reason="incident", **{k: v for k, v in rel.common.items() if k != "storage_prefix"})
    assert rel.spec()["model"]["storageUri"] == rel.uri("2") and rel.annotations() == served_v2
    assert rel.client.get_model_version_by_alias(rel.name, "champion").version == "2"
    assert rel.lease().read().intent is None


@pytest.mark.parametrize("field, value", [("previous_canary", "10"), ("previous_canary", 250), ("version", 7),
                                          ("previous_annotations", ["x"]), ("previous_uri", {"a": 1}), ("phase", "done")])
def test_an_intent_read_back_with_a_wrong_type_is_refused_by_name(field, value):
    """The intent comes back from an annotation anyone holding the Lease could have written: nothing of a
    wrong type ever reaches a patch (recover names the Lease and the field instead)."""
    from release.lease import Intent, LeaseError

    good = Intent("promote", "m", "maskrcnn", "models", "host/1/x", phase="deploying", version="3",
                  storage_uri="s3://b/m/v3", previous_uri="s3://b/m/v2", previous_canary=None)
    assert Intent.from_json(good.to_json(), "Lease models/maskrcnn-release") == good
    doc = {**json.loads(good.to_json()), field: value}
    with pytest.raises(LeaseError, match=rf"Lease models/maskrcnn-release: .* \(intent: {field}"):
        Intent.from_json(json.dumps(doc), "Lease models/maskrcnn-release")
