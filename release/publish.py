"""Publish a serving package to `s3://` or `gs://`, once, and prove it arrived intact.

A published version is immutable: pods of that version may be running, and a rollback serves it again.
Its destination must be empty; each file is created with a conditional write (S3 `If-None-Match: *`,
GCS `if_generation_match=0`), so two publishers cannot both write a key, and `SHA256SUMS` (then its
signature) goes last. Publishing the same bytes again is a no-op; different bytes are refused. The
package is then read back through `open_package` and compared file by file: only a package that passed
this may be pointed at by an InferenceService.
"""

from __future__ import annotations

import logging
import tempfile

from maskrcnn.storage import ObjectExists, SourceError, create_object, is_remote, list_objects
from maskrcnn.package import CHECKSUM_FILE, SIGNATURE_FILE, Package, PackageError, open_package

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """The package could not be uploaded, is refused by what is already there, or did not arrive intact."""


def publish_package(package: Package, uri: str) -> str:
    """Upload `package` to the empty prefix `uri` and verify it there; returns the normalized URI. When `uri`
    already holds exactly these bytes, nothing is written."""
    uri = uri.rstrip("/")
    if not is_remote(uri):
        raise PublishError(f"{uri}: expected an s3:// or gs:// destination")
    try:
        existing = list_objects(uri, allow_empty=True)
    except SourceError as exc:
        raise PublishError(f"uploading the serving package to {uri} failed: {exc}") from exc
    if existing:
        _same_or_refuse(package, uri)
        log.info("%s already holds this serving package, byte for byte; nothing to publish", uri)
        return uri
    last = [CHECKSUM_FILE, SIGNATURE_FILE]  # a reader that finds SHA256SUMS finds every file it lists
    names = [n for n in sorted(package.files) if n not in last] + [n for n in last if n in package.files]
    try:
        for name in names:
            create_object(f"{uri}/{name}", package.files[name])
    except ObjectExists as exc:
        raise PublishError(f"{uri}: another publisher wrote there meanwhile ({exc}); a published version is "
                           f"immutable, so nothing was overwritten") from exc
    except SourceError as exc:
        raise PublishError(f"uploading the serving package to {uri} failed: {exc}") from exc
    _same_or_refuse(package, uri)
    log.info("published the serving package to %s (read back and verified)", uri)
    return uri


def _same_or_refuse(package: Package, uri: str) -> None:
    """Read the package at `uri` back through the one reader and compare every file with `package`'s."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            there = open_package(uri, cache_dir=tmp)
        except PackageError as exc:
            raise PublishError(f"{uri} holds something other than this package ({exc}); a published version is "
                               f"immutable: publish under a new version (or, if it is a failed upload's leftovers, "
                               f"delete it by hand)") from exc
    differ = sorted(n for n in set(package.files) | set(there.files) if package.files.get(n) != there.files.get(n))
    if differ:
        raise PublishError(f"{uri} already holds a different serving package (differing: {', '.join(differ)}); a "
                           f"published version is immutable: publish under a new version")
