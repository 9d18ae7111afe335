"""The MLflow model registry: register a run's model with its evidence, move aliases, keep alias history.

MLflow aliases (`champion`, `challenger`) point at one version and forget where they pointed before. Every
move made here is also recorded on the versions themselves: tag `alias_history.<alias>` holds a JSON list
of `{"since", "until", "reason"}` intervals (UTC, ISO 8601), so `alias_history()` can say which version held
`champion` when, and why, from the registry alone.

Whoever registers (a training run with `tracking.register`, or the release layer after the gate), a
version is registered by `register_package`, with the same evidence tags read from the serving package
it points to: metrics, dataset hash, git commit, config, run id, epoch, and the gate's decision when
there was one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from maskrcnn.names import MODEL_NAME
from maskrcnn.logs import setup_logging
from training.model_card import version_description

if TYPE_CHECKING:
    from maskrcnn.package import Package

log = logging.getLogger(__name__)

CHAMPION = "champion"
STORAGE_URI_TAG = "serving.storage_uri"  # where the version's serving package is published (signed, stamped)
DIGEST_TAG = "serving.package_digest"  # the published package's SHA256SUMS digest (what the predictor must serve)
SCORED_DIGEST_TAG = "gate.scored_digest"  # the digest of the package the gate scored, before it was stamped
EVIDENCE_METRICS = ("segm_mAP", "bbox_mAP", "mask_iou", "segm_AP50", "mask_recall")


@dataclass(frozen=True)
class AliasInterval:
    """One stretch of time during which `version` held `alias`; `until` is None while it still does."""

    alias: str
    version: str
    since: str
    until: str | None
    reason: str


def history_tag(alias: str) -> str:
    return f"alias_history.{alias}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _missing(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def register_model(client: MlflowClient, name: str, model_uri: str, run_id: str, tags: dict[str, Any],
                   timeout: float = 300, description: str | None = None) -> str:  # the mechanism; callers use register_package
    """Register `model_uri` (already fully uploaded) as a new version of `name`, tagged with `tags`.

    Call it only after the upload has returned: a version never points at files that are not there.
    Returns the new version number.
    """
    try:
        client.create_registered_model(name, description="Mask R-CNN instance segmentation (torchvision).")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(name, source=model_uri, run_id=run_id or None, model_id=model_id,
                                          tags={k: str(v) for k, v in tags.items()}, description=description,
                                          await_creation_for=int(timeout))
    if version.status != "READY":
        raise MlflowException(f"model version {name}/{version.version} is {version.status}, not READY")
    log.info("registered %s version %s from run %s", name, version.version, run_id)
    return str(version.version)


def evidence_tags(package: Package, gate: dict[str, str] | None = None) -> dict[str, str]:
    """The tags every registered version carries, read from its serving package (metadata and config).

    `gate`: the gate's outcome (`{"decision": ..., "reason": ...}`) when a gate decided, as `gate.*` tags.
    """
    meta = package.metadata
    metrics = meta.get("metrics") or {}
    tags = {k: f"{float(metrics[k]):.6f}" for k in EVIDENCE_METRICS if k in metrics}
    tags.update({"dataset_hash": meta.get("dataset_hash", ""), "git_commit": meta.get("git_commit", ""),
                 "run_id": meta.get("mlflow_run_id", ""), "epoch": str(meta.get("epoch", "")),
                 "config": json.dumps(package.config.to_dict(), separators=(",", ":")),
                 "package.sha256sums": hashlib.sha256(package.files["SHA256SUMS"]).hexdigest()})
    for key, value in (gate or {}).items():
        tags[f"gate.{key}"] = value
    return {k: v for k, v in tags.items() if v != ""}


def register_package(client: MlflowClient, name: str, model_uri: str, package: Package,
                     gate: dict[str, str] | None = None) -> str:
    """Register the logged model `model_uri` (whose files are `package`) as a new version of `name`, with
    the evidence tags, and the package's model card (with the gate's reason) as its description. Returns
    the version number."""
    tags = evidence_tags(package, gate)
    card = package.card
    description = version_description(card, (gate or {}).get("reason", "")) if card else None
    return register_model(client, name, model_uri, tags.get("run_id", ""), tags, description=description)


def get_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding `alias`, or None when no version does (or the model does not exist)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise


def _intervals(mv: ModelVersion, alias: str) -> list[dict[str, Any]]:
    raw = (mv.tags or {}).get(history_tag(alias))
    return json.loads(raw) if raw else []


def _write_intervals(client: MlflowClient, name: str, version: str, alias: str, items: list[dict[str, Any]]) -> None:
    client.set_model_version_tag(name, version, history_tag(alias), json.dumps(items, separators=(",", ":")))


def set_alias(client: MlflowClient, name: str, alias: str, version: str, reason: str = "") -> str | None:
    """Point `alias` at `version` and record the move; returns the version that held it before (or None).

    Order: the new holder's interval is opened, the alias is moved, then the old holder's interval is
    closed, so a crash half-way leaves history that still names the version the alias points at.
    """
    version = str(version)
    previous = get_alias(client, name, alias)
    if previous is not None and str(previous.version) == version:
        return version
    stamp = now_iso()
    target = client.get_model_version(name, version)
    _write_intervals(client, name, version, alias,
                     [*_intervals(target, alias), {"since": stamp, "until": None, "reason": reason}])
    client.set_registered_model_alias(name, alias, version)
    if previous is not None:
        old = _intervals(previous, alias)
        for item in old:
            if item["until"] is None:
                item["until"] = stamp
        _write_intervals(client, name, str(previous.version), alias, old)
    log.info("%s: alias %r -> version %s (was %s)%s", name, alias, version,
             previous.version if previous else "unset", f": {reason}" if reason else "")
    return str(previous.version) if previous is not None else None


def alias_history(client: MlflowClient, name: str, alias: str) -> list[AliasInterval]:
    """Every interval any version of `name` held `alias`, oldest first."""
    out = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        for item in _intervals(mv, alias):
            out.append(AliasInterval(alias, str(mv.version), item["since"], item.get("until"), item.get("reason", "")))
    return sorted(out, key=lambda i: (i.since, int(i.version)))


def get_args_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.registry",
                                     description="Show or move model aliases (tracking URI from $MLFLOW_TRACKING_URI).")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="versions, their key tags and aliases, and the history of each alias")
    show.add_argument("name", nargs="?", default=MODEL_NAME)
    move = sub.add_parser("set-alias", help="point an alias at a version (recorded in the history)")
    move.add_argument("alias")
    move.add_argument("version")
    move.add_argument("--name", default=MODEL_NAME)
    move.add_argument("--reason", default="set by hand")
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    client = MlflowClient()
    try:
        if args.command == "set-alias":
            set_alias(client, args.name, args.alias, args.version, args.reason)
            return 0
        model = client.get_registered_model(args.name)
    except MlflowException as exc:
        log.error("%s", exc.message)
        return 1
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    print(f"{'version':>7}  {'segm_mAP':>8}  {'mask_iou':>8}  {'aliases':20}  run")
    for mv in sorted(client.search_model_versions(f"name = '{args.name}'"), key=lambda v: int(v.version)):
        tags = mv.tags or {}
        print(f"{mv.version:>7}  {tags.get('segm_mAP', '-'):>8.8}  {tags.get('mask_iou', '-'):>8.8}  "
              f"{','.join(aliases.get(str(mv.version), [])):20}  {mv.run_id}")
    for alias in sorted({a for names in aliases.values() for a in names} | {CHAMPION}):
        print(f"\nhistory of {alias!r}:")
        for item in alias_history(client, args.name, alias):
            print(f"  v{item.version:<5} {item.since} -> {item.until or 'now':29}  {item.reason}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
