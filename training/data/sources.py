"""Fetch datasets and weights from a local path, s3:// (AWS or MinIO) or gs://, into a content-keyed cache.

S3 endpoints come from the standard AWS variables (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`) or
`MLFLOW_S3_ENDPOINT_URL`, so MinIO and other S3-compatible stores work with the same settings as
MLflow. GCS honours `STORAGE_EMULATOR_HOST` (google-cloud-storage's own variable).
A prefix is listed first; the cache key is a hash of every object's key, size and ETag, so a changed
object downloads again and an unchanged prefix is never downloaded twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A dataset or weights location that cannot be read."""


@dataclass(frozen=True)
class RemoteObject:
    key: str
    size: int
    etag: str


def escapes_folder(name: str) -> bool:
    """Whether a relative name (a `file_name`, an object key under a prefix) could reach outside its folder:
    an absolute path, a drive, or a `..` component."""
    posix = PurePosixPath(name.replace("\\", "/"))
    return posix.is_absolute() or bool(PureWindowsPath(name).drive) or ".." in posix.parts


def split_uri(uri: str) -> tuple[str, str, str]:
    """`s3://bucket/a/b` -> ("s3", "bucket", "a/b")."""
    scheme, _, rest = uri.partition("://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise SourceError(f"{uri}: expected {scheme}://bucket/prefix")
    return scheme, bucket, prefix.strip("/")


def s3_client():
    """A boto3 S3 client honouring MinIO-style endpoints."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    # A fresh session: boto3's default one caches the first credentials it resolved for the process.
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None)


def gcs_client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"), credentials=AnonymousCredentials())
    return storage.Client()


def _list(uri: str) -> list[RemoteObject]:
    scheme, bucket, prefix = split_uri(uri)
    prefix_slash = f"{prefix}/" if prefix else ""
    try:
        if scheme == "s3":
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix_slash)
            objs = [RemoteObject(o["Key"], o["Size"], o["ETag"].strip('"')) for page in pages for o in page.get("Contents", [])]
        else:
            objs = [RemoteObject(b.name, b.size or 0, b.etag or b.md5_hash or "") for b in gcs_client().list_blobs(bucket, prefix=prefix_slash)]
    except Exception as exc:  # boto/google raise many types; the message names the cause
        raise SourceError(f"{uri}: cannot list objects: {exc}") from exc
    objs = [o for o in objs if not o.key.endswith("/")]
    if not objs:
        raise SourceError(f"{uri}: no objects under this prefix")
    return objs


def download_object(uri: str, key: str, dest: Path) -> None:
    """Download object `key` of the bucket named in `uri` (s3:// or gs://) to `dest`."""
    scheme, bucket, _ = split_uri(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if scheme == "s3":
            s3_client().download_file(bucket, key, str(dest))
        else:
            gcs_client().bucket(bucket).blob(key).download_to_filename(str(dest))
    except Exception as exc:
        raise SourceError(f"{scheme}://{bucket}/{key}: download failed: {exc}") from exc


def upload_object(uri: str, src: Path) -> None:
    """Upload the file `src` to the object `uri` (s3://bucket/key or gs://bucket/key)."""
    scheme, bucket, key = split_uri(uri)
    if scheme not in ("s3", "gs"):
        raise SourceError(f"{uri}: expected an s3:// or gs:// destination")
    try:
        if scheme == "s3":
            s3_client().upload_file(str(src), bucket, key)
        else:
            gcs_client().bucket(bucket).blob(key).upload_from_filename(str(src))
    except Exception as exc:
        raise SourceError(f"{uri}: upload failed: {exc}") from exc


def fetch_prefix(uri: str, cache_dir: Path) -> Path:
    """A local folder holding the objects under `uri` (downloaded once per content version)."""
    if "://" not in uri:
        path = Path(uri).expanduser()
        if not path.exists():
            raise SourceError(f"{uri}: no such file or folder")
        return path
    scheme, _, prefix = split_uri(uri)
    if scheme not in ("s3", "gs"):
        raise SourceError(f"{uri}: unsupported scheme {scheme!r}, expected a local path, s3:// or gs://")
    objects = _list(uri)
    digest = hashlib.sha256("\n".join(f"{o.key}\t{o.size}\t{o.etag}" for o in sorted(objects, key=lambda o: o.key)).encode())
    dest = cache_dir / "remote" / digest.hexdigest()[:24]
    if (dest / ".complete").exists():
        log.info("%s: cached in %s", uri, dest)
        return dest
    log.info("%s: downloading %d objects (%.1f MB) to %s", uri, len(objects), sum(o.size for o in objects) / 1e6, dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for obj in objects:
        rel = obj.key[len(prefix):].lstrip("/") if prefix else obj.key
        if not rel or escapes_folder(rel):
            raise SourceError(f"{scheme}://{split_uri(uri)[1]}/{obj.key}: the object key escapes the prefix {uri} "
                              f"(an absolute path or '..'); refusing to write it outside {dest}")
    for obj in objects:
        rel = obj.key[len(prefix):].lstrip("/") if prefix else obj.key
        download_object(uri, obj.key, tmp / rel)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    (dest / ".complete").touch()
    return dest


def fetch_file(uri: str, cache_dir: Path) -> Path:
    """A local copy of one file given as a path, s3://, gs:// or http(s):// URI."""
    if "://" not in uri:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise SourceError(f"{uri}: no such file")
        return path
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if name in ("", ".", "..") or escapes_folder(name):
        raise SourceError(f"{uri}: expected a URI naming a file, got the name {name!r}")
    dest = cache_dir / "files" / hashlib.sha256(uri.encode()).hexdigest()[:24] / name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    scheme = uri.split("://", 1)[0]
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri, timeout=60) as resp, open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out)
        except OSError as exc:
            raise SourceError(f"{uri}: download failed: {exc}") from exc
    elif scheme in ("s3", "gs"):
        _, bucket, key = split_uri(uri)
        download_object(uri, key, tmp)
    else:
        raise SourceError(f"{uri}: unsupported scheme {scheme!r}")
    tmp.rename(dest)
    return dest


def _hash_file(h: Any, path: Path) -> Any:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h


def sha256_file(path: Path) -> str:
    """The file's SHA-256, hex (what `sha256sum` prints)."""
    return _hash_file(hashlib.sha256(), path).hexdigest()


def content_hash(folder: Path, files: list[str]) -> str:
    """sha256 over the named files' relative names and bytes: the dataset's identity in MLflow."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0")
        _hash_file(h, folder / rel)
    return h.hexdigest()
