"""Pointing an InferenceService at a new model, against a real Kubernetes API server (kube-apiserver 1.20
and etcd, `devstack.kubeapi`), as the promote step's ServiceAccount with the project's own Role (a
TokenRequest token). KServe's controller cannot run here: a stand-in plays it through the same API,
writing the status fields KServe writes (`kserve_stand_in.IsvcController`), in Knative and Standard
(RawDeployment) mode; test names say `kserve_stand_in`."""

from __future__ import annotations

import pytest
from kserve_stand_in import SOURCE_URI, IsvcController

from helpers import FlakyApi, unavailable
from release.deploy import GROUP, PLURAL, VERSION, DeployError, update_storage_uri


def test_patch_then_ready_returns_the_previous_uri_kserve_stand_in(k8s):
    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace)
    ctl.create("s3://models/maskrcnn/v1")
    with ctl:
        result = update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", canary_percent=10, timeout=30,
                                    poll=0.2, kubeconfig=k8s.kubeconfig)
    assert result.previous_uri == "s3://models/maskrcnn/v1" and result.storage_uri == "s3://models/maskrcnn/v2"
    predictor = ctl.get()["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == "s3://models/maskrcnn/v2"
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["minReplicas"] == 1 and predictor["model"]["modelFormat"] == {"name": "maskrcnn"}  # untouched


def test_not_serving_in_time_rolls_back_kserve_stand_in(k8s):
    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace, rollout_s=30)
    ctl.create("s3://models/maskrcnn/v1")
    with ctl:
        with pytest.raises(DeployError, match=r"was not serving within 3 s on s3://models/maskrcnn/v2 \(revision "
                                              r"maskrcnn-predictor-00002 is not ready yet .*\); rolled back to "
                                              r"s3://models/maskrcnn/v1"):
            update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", timeout=3, poll=0.2,
                               kubeconfig=k8s.kubeconfig)
    assert ctl.seen[0] == "s3://models/maskrcnn/v2"  # it was patched, then restored
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == "s3://models/maskrcnn/v1"


def test_missing_inference_service_is_named_kserve_stand_in(k8s):
    with pytest.raises(DeployError, match=f"InferenceService {k8s.namespace}/nope: cannot read it \\(404"):
        update_storage_uri("nope", k8s.namespace, "s3://x/y", timeout=1, kubeconfig=k8s.admin)
    # the promoter's Role names its one InferenceService: any other is forbidden, whether it exists or not
    with pytest.raises(DeployError, match=f"InferenceService {k8s.namespace}/nope: cannot read it \\(403"):
        update_storage_uri("nope", k8s.namespace, "s3://x/y", timeout=1, kubeconfig=k8s.kubeconfig)


def test_real_kubectl_sees_the_patched_uri_kserve_stand_in(k8s):
    import shutil
    import subprocess

    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace)
    ctl.create("gs://bucket/maskrcnn/v1")
    with ctl:
        update_storage_uri("maskrcnn", k8s.namespace, "gs://bucket/maskrcnn/v2", timeout=30, poll=0.2,
                           kubeconfig=k8s.kubeconfig)
    out = subprocess.run([shutil.which("kubectl"), "--kubeconfig", k8s.kubeconfig, "-n", k8s.namespace, "get",
                          "inferenceservices.serving.kserve.io", "maskrcnn", "-o",
                          "jsonpath={.spec.predictor.model.storageUri}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "gs://bucket/maskrcnn/v2"


def _served_at(ctl, uri):
    return next(t for t, u in ctl.served if u == uri)


def _deploy_and_time(ctl, kubeconfig: str, uri: str) -> float:
    """Run the deploy step against the controller; returns when it returned (time.monotonic())."""
    import time

    with ctl:
        update_storage_uri("maskrcnn", ctl.namespace, uri, timeout=30, poll=0.1, kubeconfig=kubeconfig)
        return time.monotonic()


def test_it_returns_only_once_the_new_revision_serves_kserve_stand_in(k8s):
    """KServe has not reconciled for 2 s: the old revision is still Ready, with an observedGeneration (the
    Knative Service's) above the InferenceService's generation. That is not the new model serving."""
    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace, reconcile_delay_s=2.0)
    ctl.create("s3://models/maskrcnn/v1")
    returned = _deploy_and_time(ctl, k8s.kubeconfig, "s3://models/maskrcnn/v2")
    assert returned >= _served_at(ctl, "s3://models/maskrcnn/v2")
    predictor = ctl.get()["status"]["components"]["predictor"]
    assert predictor["latestReadyRevision"] == predictor["latestCreatedRevision"] == "maskrcnn-predictor-00002"


def test_a_revision_that_never_loads_fails_fast_and_rolls_back_kserve_stand_in(k8s):
    """The new revision fails to load (BlockedByFailedLoad) while the old one keeps serving: fail at once,
    not after the whole timeout, and put the old URI back."""
    import time

    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace, becomes_ready=False)
    ctl.create("s3://models/maskrcnn/v1")
    began = time.monotonic()
    with ctl, pytest.raises(DeployError, match=r"failed on s3://models/maskrcnn/v2 \(revision maskrcnn-predictor-00002: "
                                                r"BlockedByFailedLoad \(ModelLoadFailed: checksum mismatch\); "
                                                r"maskrcnn-predictor-00001 keeps serving\); rolled back"):
        update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", timeout=120, poll=0.1,
                           kubeconfig=k8s.kubeconfig)
    assert time.monotonic() - began < 30
    assert ctl.seen[0] == "s3://models/maskrcnn/v2"
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == "s3://models/maskrcnn/v1"


def test_a_canary_is_serving_when_its_share_of_traffic_is_routed_kserve_stand_in(k8s):
    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace)
    ctl.create("s3://models/maskrcnn/v1")
    with ctl:
        update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", canary_percent=25, timeout=30, poll=0.1,
                           kubeconfig=k8s.kubeconfig)
    traffic = {t["revisionName"]: t["percent"] for t in ctl.get()["status"]["components"]["predictor"]["traffic"]}
    assert traffic == {"maskrcnn-predictor-00002": 25, "maskrcnn-predictor-00001": 75}


def test_standard_mode_waits_for_the_deployment_rollout_kserve_stand_in(k8s):
    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace, mode="Standard", rollout_s=1.5)
    ctl.create("s3://models/maskrcnn/v1")
    returned = _deploy_and_time(ctl, k8s.kubeconfig, "s3://models/maskrcnn/v2")
    assert returned >= _served_at(ctl, "s3://models/maskrcnn/v2")
    deployment = ctl.apps.read_namespaced_deployment("maskrcnn-predictor", k8s.namespace)
    assert deployment.spec.template.metadata.annotations[SOURCE_URI] == "s3://models/maskrcnn/v2"


def test_standard_mode_stuck_rollout_rolls_back_kserve_stand_in(k8s):
    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace, mode="Standard", becomes_ready=False)
    ctl.create("s3://models/maskrcnn/v1")
    with ctl, pytest.raises(DeployError, match="rollout stopped: ProgressDeadlineExceeded.*rolled back to s3://models/maskrcnn/v1"):
        update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", timeout=60, poll=0.1,
                           kubeconfig=k8s.kubeconfig)


def test_a_canary_needs_knative_mode_kserve_stand_in(k8s):
    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace, mode="Standard")
    ctl.create("s3://models/maskrcnn/v1")
    with ctl, pytest.raises(DeployError, match="Standard mode: canaryTrafficPercent needs KServe's Knative"):
        update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", canary_percent=10, timeout=5,
                           kubeconfig=k8s.kubeconfig)
    assert ctl.seen == [] and ctl.get()["spec"]["predictor"]["model"]["storageUri"] == "s3://models/maskrcnn/v1"


@pytest.mark.parametrize("status,expected", [
    # KServe has not reconciled yet: the old revision is Ready, observedGeneration is the Knative Service's
    ({"observedGeneration": 9, "conditions": [{"type": "Ready", "status": "True"}],
      "components": {"predictor": {"latestCreatedRevision": "p-00001", "latestReadyRevision": "p-00001",
                                   "traffic": [{"revisionName": "p-00001", "percent": 100, "latestRevision": True}]}}}, "waiting"),
    # the new revision exists but the old one still serves
    ({"conditions": [{"type": "Ready", "status": "True"}],
      "components": {"predictor": {"latestCreatedRevision": "p-00002", "latestReadyRevision": "p-00001"}}}, "waiting"),
    ({"conditions": [{"type": "Ready", "status": "False"}], "modelStatus": {"transitionStatus": "InvalidSpec"},
      "components": {"predictor": {"latestCreatedRevision": "p-00002", "latestReadyRevision": "p-00001"}}}, "failed"),
    ({"conditions": [{"type": "Ready", "status": "True"}],
      "components": {"predictor": {"latestCreatedRevision": "p-00002", "latestReadyRevision": "p-00002",
                                   "traffic": [{"revisionName": "p-00002", "percent": 100, "latestRevision": True}]}}}, "serving"),
])
def test_knative_progress_reads_kserve_status(status, expected):
    from release.deploy import knative_progress

    assert knative_progress({"metadata": {"generation": 2}, "status": status}, "p-00001", None)[0] == expected


def test_a_get_that_fails_once_is_retried_kserve_stand_in(k8s, caplog):
    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace)
    ctl.create("s3://models/maskrcnn/v1")
    api = FlakyApi(k8s.kubeconfig, lambda n: unavailable() if n == 1 else None)
    with ctl:
        result = update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", timeout=30, poll=0.1, api=api)
    assert result.storage_uri == "s3://models/maskrcnn/v2" and api.gets >= 2
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == "s3://models/maskrcnn/v2"
    assert "ApiException" in caplog.text and "retrying" in caplog.text


def test_a_get_that_fails_until_the_deadline_rolls_back_at_the_deadline_kserve_stand_in(k8s):
    """Every GET answers 503 for 3 s: the wait gives up at its 2 s deadline, and the rollback (conditional on
    the resourceVersion: KServe wrote status since the patch, so it reads again, retrying) puts v1 back."""
    import time

    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace)
    ctl.create("s3://models/maskrcnn/v1")
    until = time.monotonic() + 3
    api = FlakyApi(k8s.kubeconfig, lambda n: unavailable() if time.monotonic() < until else None)
    with ctl, pytest.raises(DeployError, match=r"was not serving within 2 s on s3://models/maskrcnn/v2 \(last error: "
                                                r"ApiException: \(503\) Reason: Service Unavailable\); rolled back to s3://models/maskrcnn/v1"):
        update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", timeout=2, poll=0.1, api=api)
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == "s3://models/maskrcnn/v1"


def test_a_rollback_never_writes_blind_kserve_stand_in(k8s):
    """Every GET fails for good after the patch, and KServe has written status since: the rollback cannot
    confirm the spec is still its own, so it writes nothing and says so (the release keeps its intent
    for `release recover`)."""
    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace)
    ctl.create("s3://models/maskrcnn/v1")
    api = FlakyApi(k8s.kubeconfig, lambda n: unavailable())
    with ctl, pytest.raises(DeployError, match=r"rolling back to s3://models/maskrcnn/v1 FAILED too \(ApiException: "
                                                r"\(503\) Reason: Service Unavailable\)"):
        update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", timeout=2, poll=0.1, api=api)
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == "s3://models/maskrcnn/v2"


def test_patches_are_conditional_on_what_was_read_kserve_stand_in(k8s):
    """A patch carries the resourceVersion it read: a status write since (KServe) is read again and the patch
    goes through; a spec change since (someone else) refuses it, and theirs stands."""
    from release.deploy import GROUP, PLURAL, VERSION, _ChangedElsewhere, conditional_patch, custom_objects_api

    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace)
    ctl.create("s3://models/maskrcnn/v1")
    api = custom_objects_api(k8s.kubeconfig)
    read = api.get_namespaced_custom_object(GROUP, VERSION, k8s.namespace, PLURAL, "maskrcnn")
    ctl._status({"conditions": ctl._ready("True", "Reconciled")})  # KServe writes status: a new resourceVersion
    patched = conditional_patch(api, "maskrcnn", k8s.namespace, expect_uri="s3://models/maskrcnn/v1",
                                uri="s3://models/maskrcnn/v2", canary=None, set_canary=False, obj=read)
    assert patched["spec"]["predictor"]["model"]["storageUri"] == "s3://models/maskrcnn/v2"
    ctl.api.patch_namespaced_custom_object(GROUP, VERSION, k8s.namespace, PLURAL, "maskrcnn",
                                           {"spec": {"predictor": {"model": {"storageUri": "s3://models/hotfix"}}}})
    with pytest.raises(_ChangedElsewhere, match="storageUri is s3://models/hotfix .* someone else changed it"):
        conditional_patch(api, "maskrcnn", k8s.namespace, expect_uri="s3://models/maskrcnn/v2",
                          uri="s3://models/maskrcnn/v1", canary=None, set_canary=False, obj=patched)
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == "s3://models/hotfix"
    # and a blind write of the stale resourceVersion is what the API server refuses (409), not us alone
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as conflict:
        api.patch_namespaced_custom_object(GROUP, VERSION, k8s.namespace, PLURAL, "maskrcnn", {
            "metadata": {"resourceVersion": patched["metadata"]["resourceVersion"]},
            "spec": {"predictor": {"model": {"storageUri": "s3://models/maskrcnn/v1"}}}})
    assert conflict.value.status == 409


def test_a_get_that_fails_for_good_rolls_back_at_once_kserve_stand_in(k8s):
    """A 403 (the Role lost `get`) is not transient: no waiting out the timeout. The URI is put back with
    the resourceVersion the patch returned, as long as nothing wrote since (KServe has not reconciled yet:
    its controller here waits 2 s); once KServe has written its status, the rollback cannot read the
    service again and never writes blind: it says to restore by hand. (Which of the two happened used to
    depend on the race between the rollback and the stand-in's status write.)"""
    import time

    from kubernetes.client.exceptions import ApiException

    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace, reconcile_delay_s=2.0)
    ctl.create("s3://models/maskrcnn/v1")
    api = FlakyApi(k8s.kubeconfig, lambda n: ApiException(status=403, reason="Forbidden"))
    began = time.monotonic()
    with ctl, pytest.raises(DeployError, match=r"could not be watched while it rolled out s3://models/maskrcnn/v2 "
                                                r"\(ApiException: \(403\) Reason: Forbidden\); rolled back to s3://models/maskrcnn/v1"):
        update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", timeout=60, poll=0.1, api=api)
    assert time.monotonic() - began < 10
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == "s3://models/maskrcnn/v1"

    # KServe wrote its status between the patch and the rollback: the rollback's resourceVersion is stale,
    # the service cannot be read again (403), so nothing is written blind and the message says so
    class StatusAfterPatch(FlakyApi):
        def patch_namespaced_custom_object(self, *args):
            answer = super().patch_namespaced_custom_object(*args)
            _touch_status(ctl)
            return answer

    late = StatusAfterPatch(k8s.kubeconfig, lambda n: ApiException(status=403, reason="Forbidden"))
    with pytest.raises(DeployError, match=r"rolling back to s3://models/maskrcnn/v1 FAILED too \(ApiException: \(403\) "
                                          r"Reason: Forbidden\): restore it by hand"):
        update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v3", timeout=60, poll=0.1, api=late)
    assert ctl.get()["spec"]["predictor"]["model"]["storageUri"] == "s3://models/maskrcnn/v3"  # not overwritten blind


def _touch_status(ctl: IsvcController) -> None:
    """A status write as KServe's controller makes one (through the status subresource): a new resourceVersion."""
    ctl.api.patch_namespaced_custom_object_status(GROUP, VERSION, ctl.namespace, PLURAL, ctl.name,
                                                  {"status": {"observedGeneration": 99}})


def test_already_set_still_waits_until_kserve_serves_it_kserve_stand_in(k8s):
    """The URI is already the target (a retried promotion), but its revision failed to load: not a success."""
    ctl = IsvcController(k8s.admin, "maskrcnn", k8s.namespace, becomes_ready=False)
    ctl.create("s3://models/maskrcnn/v1")
    with ctl:
        with pytest.raises(DeployError):
            update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", timeout=30, poll=0.1,
                               kubeconfig=k8s.kubeconfig)
        ctl.api.patch_namespaced_custom_object("serving.kserve.io", "v1beta1", k8s.namespace, "inferenceservices", "maskrcnn",
                                               {"spec": {"predictor": {"model": {"storageUri": "s3://models/maskrcnn/v2"}}}})
        with pytest.raises(DeployError, match=r"already points at s3://models/maskrcnn/v2, but KServe does not serve it"):
            update_storage_uri("maskrcnn", k8s.namespace, "s3://models/maskrcnn/v2", timeout=3, poll=0.1,
                               kubeconfig=k8s.kubeconfig)
    ready = IsvcController(k8s.admin, "other", k8s.namespace)
    ready.create("s3://models/other/v1")
    with ready:
        assert update_storage_uri("other", k8s.namespace, "s3://models/other/v1", timeout=30, poll=0.1,
                                  kubeconfig=k8s.admin).storage_uri == "s3://models/other/v1"  # the Role names maskrcnn only
