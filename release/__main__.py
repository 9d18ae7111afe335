"""`uv run -m release promote|rollback`: gate, register, publish and deploy a trained model, or roll back.

The tracking server is $MLFLOW_TRACKING_URI (or --tracking-uri); object storage and Kubernetes come
from the usual variables and kubeconfig, as for the pipeline.

  uv run -m release promote RUN_ID --storage-prefix s3://models [--isvc-name maskrcnn --namespace models]
  uv run -m release rollback 3 --isvc-name maskrcnn --namespace models --reason "incident 42"
  uv run -m release recover --isvc-name maskrcnn --namespace models
  uv run -m release keygen signing.key signing.pub
  uv run -m release retrain --data gs://RAY_BUCKET/data/coco --claims gs://RAY_BUCKET/retrain-claims \
      --release-record gs://RAY_BUCKET/release.json --kfp-host URL
  terraform -chdir=infra/gke output -json placeholders | uv run -m release placeholders
  uv run -m release ship --repository REGION-docker.pkg.dev/PROJECT/maskrcnn/platform --kfp-host URL \
      [--record gs://RAY_BUCKET/release.json] [--run] [--cron ...]

`promote` downloads the run's model (its serving package), scores it and the current champion on the
same validation split (`--val-data`, default: the split the model was trained with), applies the gate,
and promotes it when it passes. With `--canary-percent P` the new version first serves P% of the traffic
and is judged on live metrics against the champion (`--prometheus-url`, see release.canary). Exit status:
0 promoted (or rolled back), 3 rejected by the gate, 4 the canary judged and rolled back, 1 publish or
deploy failure (rolled back where it got that far), 2 bad arguments, 5 another release of the
InferenceService is in flight or an interrupted one must be recovered first (nothing was changed),
128+N stopped by signal N (SIGTERM: 143) after unwinding.

A release holds the InferenceService's Lease and writes its intent there before it patches anything
(release.lease). `recover` finishes or undoes a release that was killed outright (SIGKILL, a lost node):
the next promote or rollback refuses to start until it has run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from pathlib import Path

from release.canary import CanaryBounds, CanaryError
from release.deploy import DeployError
from release.gate import Thresholds
from release.lease import DEFAULT_DURATION_S
from maskrcnn import cli
from maskrcnn.names import PIPELINE_NAME, SIGNING_KEY_ENV
from release.ship import KFP_TOKEN_ENV
from release.publish import PublishError
from maskrcnn.names import MODEL_NAME
from maskrcnn.logs import setup_logging

log = logging.getLogger("release")

REJECTED = 3
CANARY_ROLLED_BACK = 4
IN_FLIGHT = 5
GATE = Thresholds()  # the gate's defaults, written once in release.gate
PROMETHEUS_TOKEN_ENV = "MASKRCNN_PROMETHEUS_TOKEN_FILE"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m release", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default="", help="default $MLFLOW_TRACKING_URI")
    p.add_argument("--model-name", default=MODEL_NAME, help="registered model name")
    p.add_argument("--isvc-name", default="", help="InferenceService to point at the model (empty: none)")
    p.add_argument("--namespace", default="models")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for Ready before rolling back")
    p.add_argument("--kubeconfig", default="", help="default: in-cluster config, else ~/.kube/config")
    p.add_argument("--as-service-account", default="", metavar="NAME",
                   help="act as this ServiceAccount of --namespace (a short-lived token requested with your own "
                        "credentials, as the pipeline's promote step acts as maskrcnn-promoter); empty: yourself")
    p.add_argument("--lease-seconds", type=int, default=DEFAULT_DURATION_S,
                   help="how long the InferenceService's release Lease outlives a killed release (renewed every "
                        "third of it while the release runs)")
    sub = p.add_subparsers(dest="command", required=True)
    _promote_arguments(sub.add_parser("promote", help="score, gate, register, publish, deploy, move champion"))
    _ship_arguments(sub.add_parser("ship", help="build and push the image, compile the pipeline on its digest, upload it "
                                                "to Kubeflow as a version named after the commit, optionally run or "
                                                "schedule it"))
    _retrain_arguments(sub.add_parser("retrain", help="start the pipeline when the data's content hash differs from the "
                                                      "champion's (for a CronJob: deployment/retrain)"))
    sub.add_parser("placeholders", help="fill the manifests' placeholders from `terraform output -json placeholders` "
                                        "on stdin (infra/gke)")
    back = sub.add_parser("rollback", help="serve an earlier published version again and move champion to it")
    back.add_argument("version")
    back.add_argument("--reason", default="rolled back by hand")
    sub.add_parser("recover", help="finish or undo a release of --isvc-name that was killed before it ended (from "
                                   "the intent on its Lease)")
    keys = sub.add_parser("keygen", help="write a new Ed25519 key pair for signing packages (see the README)")
    keys.add_argument("private_key", help="file for the private key (created owner-only; never overwritten)")
    keys.add_argument("public_key", help="file for the public key (PEM), for the predictor's ConfigMap")
    return p


def _promote_arguments(up: argparse.ArgumentParser) -> None:
    up.add_argument("run_id", help="MLflow run whose logged model is the candidate")
    up.add_argument("--storage-prefix", required=True, help="s3:// or gs:// prefix for serving packages")
    up.add_argument("--val-data", default="", help="validation split (folder, s3://, gs://); default: the model's own")
    up.add_argument("--min-segm-map", type=float, default=GATE.min_segm_map)
    up.add_argument("--min-mask-iou", type=float, default=GATE.min_mask_iou)
    up.add_argument("--margin", type=float, default=GATE.margin, help="segm mAP the candidate must beat the champion by")
    up.add_argument("--require-lower-bound", action="store_true",
                    help="the lower bound of the 95%% paired-bootstrap interval of candidate - champion segm mAP must "
                         "exceed --margin too (better beyond the validation split's noise)")
    up.add_argument("--canary-percent", type=int, default=0,
                    help="serve the new version to this share of the traffic first (1-99), judge it on live metrics "
                         "against the champion (needs --prometheus-url), then promote it to all the traffic or roll "
                         "it back; 0: all the traffic at once")
    up.add_argument("--prometheus-url", default="", help="the Prometheus that scrapes the predictors (canary analysis)")
    up.add_argument("--prometheus-selector", default="",
                    help='label matchers that scope the predictors\' series, e.g. namespace="models" (comma-separated)')
    up.add_argument("--prometheus-token-file", default=os.environ.get(PROMETHEUS_TOKEN_ENV, ""),
                    help=f"a file holding a bearer token for Prometheus (default ${PROMETHEUS_TOKEN_ENV}; empty: none)")
    for f in dataclasses.fields(CanaryBounds):
        up.add_argument(f"--canary-{f.name.replace('_', '-')}", dest=f"canary_{f.name}", type=type(f.default),
                        default=f.default, help=f"canary analysis bound, default {f.default} (release.canary.CanaryBounds)")
    up.add_argument("--signing-key", default=os.environ.get(SIGNING_KEY_ENV, ""),
                    help=f"Ed25519 private key (PEM file, e.g. a mounted Secret) that signs the published package's "
                         f"SHA256SUMS; default ${SIGNING_KEY_ENV}; empty: unsigned")


def _ship_arguments(out: argparse.ArgumentParser) -> None:
    out.add_argument("--repository", required=True,
                     help="the image's repository without tag, e.g. REGION-docker.pkg.dev/PROJECT/maskrcnn/platform")
    out.add_argument("--commit", default="", help="the git commit (default: git rev-parse HEAD)")
    out.add_argument("--tag", default="", help="the image tag (default: the commit's first 12 characters)")
    out.add_argument("--builder", default="", choices=["", "podman", "buildah", "docker"], help="default: the first found")
    out.add_argument("--context", default=".", help="the build context (default: the current folder)")
    out.add_argument("--containerfile", default="Dockerfile", help="the Dockerfile, relative to the current folder")
    out.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE", help="passed to the build (repeatable)")
    out.add_argument("--insecure-registry", action="store_true",
                     help="push without TLS (a registry on 127.0.0.1 only; podman and buildah)")
    out.add_argument("--prebuilt", default="", metavar="SHA256_DIGEST",
                     help="the image is already pushed to --repository with this digest: compile and upload only")
    out.add_argument("--output", default="maskrcnn_pipeline.yaml", help="where the compiled pipeline is written")
    out.add_argument("--record", default="", metavar="S3_OR_GS_JSON",
                     help="record the uploaded version as the release (the pipeline version `retrain` runs)")
    out.add_argument("--kfp-host", default="", help="Kubeflow Pipelines' API (empty: compile only)")
    out.add_argument("--kfp-namespace", default="", help="multi-user Kubeflow: the profile namespace")
    out.add_argument("--kfp-token-file", default=os.environ.get(KFP_TOKEN_ENV, ""),
                     help=f"a file holding the bearer token for Kubeflow (default ${KFP_TOKEN_ENV})")
    out.add_argument("--pipeline-name", default=PIPELINE_NAME)
    out.add_argument("--experiment", default="maskrcnn")
    out.add_argument("--run", action="store_true", help="start one run of the new version")
    out.add_argument("--cron", default="", help="make the new version the recurring run (6 fields, seconds first)")
    out.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                     help="a pipeline parameter of the runs, its value as JSON or a plain string (repeatable)")


def _retrain_arguments(again: argparse.ArgumentParser) -> None:
    again.add_argument("--data", required=True, help="the training data prefix (s3://, gs://, folder), as the pipeline's data")
    again.add_argument("--val-data", default="", help="the validation split (default: held out of --data)")
    again.add_argument("--config", default="default", help="the training config the pipeline runs (its data settings)")
    again.add_argument("--claims", required=True, help="s3:// or gs:// prefix where each started hash is claimed once")
    again.add_argument("--release-record", required=True, metavar="S3_OR_GS_JSON",
                       help="the record `release ship --record` wrote: the pipeline version to run")
    again.add_argument("--staging", default="", help="s3:// or gs:// prefix where the hashed data is copied for the run "
                                                     "(default: <claims>/datasets)")
    again.add_argument("--grace-seconds", type=float, default=3600.0,
                       help="a claim whose run never started, failed or is gone is taken over after this long")
    again.add_argument("--kfp-host", required=True, help="Kubeflow Pipelines' API")
    again.add_argument("--kfp-namespace", default="")
    again.add_argument("--kfp-token-file", default=os.environ.get(KFP_TOKEN_ENV, ""))
    again.add_argument("--pipeline-name", default=PIPELINE_NAME)
    again.add_argument("--experiment", default="maskrcnn")
    again.add_argument("--param", action="append", default=[], metavar="KEY=JSON", help="another pipeline parameter (repeatable)")


def logged_model_of(client, run_id: str) -> str:
    """The URI (`models:/m-...`) of the serving package logged by `run_id`; the newest if it logged several."""
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                         order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    ready = [m for m in models if str(m.status).endswith("READY")]
    if not ready:
        raise FileNotFoundError(f"run {run_id} logged no model (train with tracking.log_model=true)")
    return f"models:/{ready[0].model_id}"


def validation_split(package, val_data: str):
    """The split to score on: `val_data`, else the validation split of the data the package was trained on."""
    from training.data.prepare import prepare_data

    cfg = package.config.replace(data={"val": val_data}) if val_data else package.config
    return prepare_data(cfg.data, validate=True).val


def cmd_promote(args: argparse.Namespace, tracking_uri: str) -> int:
    from mlflow.tracking import MlflowClient

    from release.gate import judge, record_gate
    from release.promote import promote
    from release.scoring import score_candidate_and_champion
    from maskrcnn.package import open_package
    from maskrcnn.signature import load_private_key
    from training.tracking import download_model

    signing_key = load_private_key(args.signing_key) if args.signing_key else None  # before any work: fail fast
    canary_plan = canary_plan_from(args)
    client = MlflowClient(tracking_uri)
    model_uri = logged_model_of(client, args.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        package = open_package(download_model(tracking_uri, model_uri, tmp))  # verified bytes, held in memory
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.html"
        scores = score_candidate_and_champion(package, validation_split(package, args.val_data), tracking_uri,
                                              args.model_name, report=report)
        client.log_artifact(args.run_id, str(report), "gate")  # the gate's view: against the champion
    decision = judge(scores, Thresholds(args.min_segm_map, args.min_mask_iou, args.margin, args.require_lower_bound))
    record_gate(client, args.run_id, decision)
    if not decision.promote:
        log.warning("%s", decision.reason)
        return REJECTED
    result = promote(package_dir=package, model_uri=model_uri, tracking_uri=tracking_uri, model_name=args.model_name,
                     storage_prefix=args.storage_prefix, gate=decision, isvc_name=args.isvc_name,
                     namespace=args.namespace, canary_percent=args.canary_percent or None, canary_plan=canary_plan,
                     ready_timeout=args.ready_timeout, kubeconfig=args.kubeconfig, signing_key=signing_key,
                     lease_s=args.lease_seconds, scored_digest=package.digest)
    log.info("%s v%s is the champion, served from %s", args.model_name, result.version, result.storage_uri)
    return 0


def canary_plan_from(args: argparse.Namespace):
    """The canary analysis the flags ask for (None without --canary-percent); ValueError names the bad flag."""
    from release.canary import PrometheusApi, selector_for
    from release.promote import CanaryPlan

    if not args.canary_percent:
        return None
    if not args.prometheus_url:
        raise ValueError("--canary-percent needs --prometheus-url: a canary is judged on live metrics")
    PrometheusApi(args.prometheus_url)  # validates the URL
    selector_for("0", args.prometheus_selector)  # validates the selector
    token = _token(args.prometheus_token_file, "--prometheus-token-file")
    bounds = CanaryBounds(**{f.name: getattr(args, f"canary_{f.name}") for f in dataclasses.fields(CanaryBounds)})
    return CanaryPlan(args.prometheus_url, bounds, args.prometheus_selector, token)


def cmd_rollback(args: argparse.Namespace, tracking_uri: str) -> int:
    from release.promote import rollback

    result = rollback(tracking_uri=tracking_uri, model_name=args.model_name, version=args.version, reason=args.reason,
                      isvc_name=args.isvc_name, namespace=args.namespace, ready_timeout=args.ready_timeout,
                      kubeconfig=args.kubeconfig, lease_s=args.lease_seconds)
    log.info("%s v%s is the champion again, served from %s", args.model_name, result.version, result.storage_uri)
    return 0


def cmd_recover(args: argparse.Namespace, tracking_uri: str) -> int:
    from release.promote import recover

    if not args.isvc_name:
        raise ValueError("recover: --isvc-name is required (the InferenceService whose release was interrupted)")
    outcome = recover(tracking_uri=tracking_uri, isvc_name=args.isvc_name, namespace=args.namespace,
                      ready_timeout=args.ready_timeout, kubeconfig=args.kubeconfig)
    log.info("%s", outcome)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from maskrcnn.signature import generate_keypair

    try:
        key = generate_keypair(args.private_key, args.public_key)
    except FileExistsError:
        log.error("%s exists; a private key is never overwritten (remove it first if you mean to)", args.private_key)
        return 2
    log.info("wrote key %s: private %s (keep it secret), public %s", key, args.private_key, args.public_key)
    return 0


def _pairs(items: list[str], flag: str, as_json: bool = True) -> dict:
    """KEY=VALUE flags; with `as_json`, the value read as JSON when it is JSON, else kept as the string."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value) if as_json else value
        except json.JSONDecodeError:
            out[key] = value
    return out


def _token(path: str, flag: str) -> str:
    """A bearer token from the file `path` (a mounted Secret; never a command-line value); "" without one."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(8192).strip()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: {exc.strerror}") from exc


def cmd_retrain(args: argparse.Namespace) -> int:
    from release.retrain import RetrainError, RetrainPlan, retrain
    from training.data.coco import DatasetError
    from maskrcnn.storage import SourceError
    from training.tracking import resolve_tracking_uri

    def run() -> int:
        token = _token(args.kfp_token_file, "--kfp-token-file")
        plan = RetrainPlan(data=args.data, val_data=args.val_data, config=args.config, claims=args.claims,
                           release_record=args.release_record, staging=args.staging, grace_s=args.grace_seconds,
                           kfp_host=args.kfp_host, kfp_namespace=args.kfp_namespace,
                           tracking_uri=resolve_tracking_uri(args.tracking_uri), model_name=args.model_name,
                           pipeline_name=args.pipeline_name, experiment=args.experiment,
                           params=_pairs(args.param, "--param"))
        result = retrain(plan, token)
        log.info("retrain: %s (dataset %s)%s", result.action, result.dataset_hash[:12],
                 f", run {result.run_id}" if result.run_id else "")
        return 0

    return cli.run(run, {(ValueError, OSError, DatasetError): 2, (RetrainError, SourceError): 1}, log, "retrain: ")


def cmd_ship(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    from release.ship import ShipError, ShipPlan, ship

    def plan() -> ShipPlan:
        commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                               check=True).stdout.strip()
        return ShipPlan(repository=args.repository, commit=commit, tag=args.tag, builder=args.builder,
                        context=Path(args.context), containerfile=Path(args.containerfile),
                        build_args=_pairs(args.build_arg, "--build-arg", as_json=False), tls_verify=not args.insecure_registry,
                        kfp_host=args.kfp_host, kfp_namespace=args.kfp_namespace, pipeline_name=args.pipeline_name,
                        experiment=args.experiment, run=args.run, cron=args.cron,
                        params=_pairs(args.param, "--param"), output=Path(args.output), prebuilt=args.prebuilt,
                        record=args.record)

    def run() -> int:
        try:  # a bad flag (2) before anything is built or pushed, a failed ship (1) after
            planned, token = plan(), _token(args.kfp_token_file, "--kfp-token-file")
        except (ValueError, OSError, subprocess.CalledProcessError) as exc:
            raise _Usage(exc) from exc
        shipped = ship(planned, token)
        log.info("shipped %s@%s; pipeline %s%s", planned.repository, shipped.digest, shipped.pipeline_yaml,
                 f", version {shipped.version_id}" if shipped.version_id else "")
        return 0

    return cli.run(run, {_Usage: 2, ShipError: 1}, log)


class _Usage(Exception):
    """A command's input is wrong (exit 2), whatever the error that said so."""


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    if args.command == "keygen":
        return cmd_keygen(args)
    if args.command == "ship":
        return cmd_ship(args)
    if args.command == "retrain":
        return cmd_retrain(args)
    if args.command == "placeholders":
        from release.placeholders import main as fill_main

        return fill_main()
    from mlflow.exceptions import MlflowException

    from maskrcnn.config import ConfigError
    from training.data.coco import DatasetError
    from maskrcnn.package import PackageError
    from maskrcnn.signature import SignatureError
    from release.interrupt import Interrupted, unwind_on_signals
    from release.lease import LeaseError, ReleaseInFlight
    from release.promote import CanaryRejected
    from training.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    if args.as_service_account:
        from release.deploy import PROMOTER_ENV

        os.environ[PROMOTER_ENV] = f"{args.namespace}/{args.as_service_account}"
    command = {"promote": cmd_promote, "rollback": cmd_rollback, "recover": cmd_recover}[args.command]

    def run() -> int:
        try:
            with unwind_on_signals():
                return command(args, tracking_uri)
        except Interrupted as exc:
            log.error("%s: %s stopped after unwinding (see the version's promotion.failed tag)", exc, args.command)
            return exc.exit_code

    return cli.run(run, {ReleaseInFlight: IN_FLIGHT, CanaryRejected: CANARY_ROLLED_BACK,
                         (FileNotFoundError, ConfigError, DatasetError, MlflowException, PackageError, SignatureError,
                          ValueError): 2,
                         (PublishError, DeployError, CanaryError, LeaseError): 1}, log)

if __name__ == "__main__":
    sys.exit(main())
