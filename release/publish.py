"""Publish a serving package to `s3://` or `gs://`, and prove it arrived intact.

Files are uploaded with `SHA256SUMS` last, then every object is downloaded again and checked against
it. Only a package that passed this check may be pointed at by an InferenceService.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from training.export import CHECKSUM_FILE, PackageError, verify_package
from training.data.sources import download_object, split_uri, upload_object

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """The package could not be uploaded, or what arrived does not match its checksums."""


def publish_package(package_dir: str | Path, uri: str) -> str:
    """Upload the package folder to `uri` (a prefix) and verify it there; returns the normalized URI."""
    package_dir = Path(package_dir)
    names = [*verify_package(package_dir), CHECKSUM_FILE]  # never upload a package that is already broken
    uri = uri.rstrip("/")
    if not uri.startswith(("s3://", "gs://")):
        raise PublishError(f"{uri}: expected an s3:// or gs:// destination")
    try:
        for name in names:
            upload_object(f"{uri}/{name}", package_dir / name)
    except Exception as exc:  # SourceError; the message names the object and the cause
        raise PublishError(f"uploading the serving package to {uri} failed: {exc}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in names:
                download_object(uri, f"{split_uri(uri)[2]}/{name}", Path(tmp) / name)
            verify_package(tmp)
        except PackageError as exc:
            raise PublishError(f"the package uploaded to {uri} does not match its checksums: {exc}") from exc
        except Exception as exc:
            raise PublishError(f"reading back the package at {uri} failed: {exc}") from exc
    log.info("published the serving package to %s (checksums verified after upload)", uri)
    return uri
