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
import tempfile
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

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


class ObjectExists(SourceError):
    """A create-only write found an object already at the key."""


class ObjectChanged(SourceError):
    """A conditional replace found the object changed (or gone) since it was read."""


class _S3:
    """Amazon S3 and S3-compatible stores (Ceph RGW, MinIO) through boto3."""

    def list(self, bucket: str, prefix: str) -> list[RemoteObject]:
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [RemoteObject(o["Key"], o["Size"], o["ETag"].strip('"')) for page in pages for o in page.get("Contents", [])]

    def download(self, bucket: str, key: str, dest: Path) -> None:
        s3_client().download_file(bucket, key, str(dest))

    def upload(self, bucket: str, key: str, src: Path) -> None:
        s3_client().upload_file(str(src), bucket, key)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)

    def create(self, bucket: str, key: str, data: bytes) -> str:
        from botocore.exceptions import ClientError

        try:  # a conditional write: the store refuses it when the key exists (S3's If-None-Match: *)
            return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") \
                    or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                raise ObjectExists(f"s3://{bucket}/{key}: already exists") from None
            raise


    def read(self, bucket: str, key: str, limit: int) -> tuple[bytes, str]:
        answer = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limit}")
        return answer["Body"].read(limit + 1), answer["ETag"]

    def replace(self, bucket: str, key: str, data: bytes, token: str) -> None:
        from botocore.exceptions import ClientError

        # S3's If-Match: the write lands only on the version that was read. Ceph's gateway compares the bare
        # ETag, AWS documents the quoted one: the other form is tried only while the object is unchanged.
        bare = token.strip('"')
        for tag in (bare, f'"{bare}"'):
            try:
                s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=tag)
                return
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") not in (404, 409, 412):
                    raise
            try:
                if s3_client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"') != bare:
                    break
            except ClientError:
                break
        raise ObjectChanged(f"s3://{bucket}/{key}: changed since it was read")

    def delete(self, bucket: str, key: str) -> None:
        s3_client().delete_object(Bucket=bucket, Key=key)


class _GCS:
    """Google Cloud Storage through google-cloud-storage (`STORAGE_EMULATOR_HOST` for its emulator)."""

    def list(self, bucket: str, prefix: str) -> list[RemoteObject]:
        return [RemoteObject(b.name, b.size or 0, b.etag or b.md5_hash or "")
                for b in gcs_client().list_blobs(bucket, prefix=prefix)]

    def download(self, bucket: str, key: str, dest: Path) -> None:
        gcs_client().bucket(bucket).blob(key).download_to_filename(str(dest))

    def upload(self, bucket: str, key: str, src: Path) -> None:
        gcs_client().bucket(bucket).blob(key).upload_from_filename(str(src))

    def put(self, bucket: str, key: str, data: bytes) -> None:
        gcs_client().bucket(bucket).blob(key).upload_from_string(data)

    def create(self, bucket: str, key: str, data: bytes) -> str:
        from google.api_core.exceptions import PreconditionFailed

        try:  # generation 0 means "no live object": GCS refuses the write when one exists
            blob = gcs_client().bucket(bucket).blob(key)
            blob.upload_from_string(data, if_generation_match=0)
            return str(blob.generation)
        except PreconditionFailed:
            raise ObjectExists(f"gs://{bucket}/{key}: already exists") from None


    def read(self, bucket: str, key: str, limit: int) -> tuple[bytes, str]:
        blob = gcs_client().bucket(bucket).get_blob(key)
        if blob is None:
            raise FileNotFoundError(f"gs://{bucket}/{key}")
        return blob.download_as_bytes(end=limit, if_generation_match=blob.generation), str(blob.generation)

    def replace(self, bucket: str, key: str, data: bytes, token: str) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:  # the generation that was read: GCS refuses the write when another has replaced it
            gcs_client().bucket(bucket).blob(key).upload_from_string(data, if_generation_match=int(token))
        except (PreconditionFailed, NotFound):
            raise ObjectChanged(f"gs://{bucket}/{key}: changed since it was read") from None

    def delete(self, bucket: str, key: str) -> None:
        gcs_client().bucket(bucket).blob(key).delete()


SCHEMES: dict[str, Any] = {"s3": _S3(), "gs": _GCS()}
"""The object stores, by URI scheme: the one place a scheme is known."""


def is_remote(uri: str | Path) -> bool:
    """Whether `uri` names an object store prefix or object (a scheme in `SCHEMES`) rather than a local path."""
    return "://" in str(uri) and str(uri).split("://", 1)[0] in SCHEMES


def store(uri: str) -> tuple[Any, str, str]:
    """(the store's backend, bucket, key or prefix) of an object store URI; SourceError for anything else."""
    scheme, bucket, key = split_uri(uri)
    if scheme not in SCHEMES:
        raise SourceError(f"{uri}: unsupported scheme {scheme!r}; expected one of {', '.join(f'{s}://' for s in SCHEMES)}")
    return SCHEMES[scheme], bucket, key


def list_objects(uri: str, allow_empty: bool = False) -> list[RemoteObject]:
    """The objects under the prefix `uri` (folder markers left out)."""
    backend, bucket, prefix = store(uri)
    try:
        objs = backend.list(bucket, f"{prefix}/" if prefix else "")
    except Exception as exc:  # boto/google raise many types; the message names the cause
        raise SourceError(f"{uri}: cannot list objects: {exc}") from exc
    objs = [o for o in objs if not o.key.endswith("/")]
    if not objs and not allow_empty:
        raise SourceError(f"{uri}: no objects under this prefix")
    return objs


def download_object(uri: str, key: str, dest: Path) -> None:
    """Download object `key` of the bucket named in `uri` (s3:// or gs://) to `dest`."""
    backend, bucket, _ = store(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        backend.download(bucket, key, dest)
    except Exception as exc:
        raise SourceError(f"{uri.split('://')[0]}://{bucket}/{key}: download failed: {exc}") from exc


def upload_object(uri: str, src: Path) -> None:
    """Upload the file `src` to the object `uri` (s3://bucket/key or gs://bucket/key)."""
    backend, bucket, key = store(uri)
    try:
        backend.upload(bucket, key, src)
    except Exception as exc:
        raise SourceError(f"{uri}: upload failed: {exc}") from exc


def write_object(uri: str, data: bytes) -> None:
    """Write `data` as the object `uri` in one request (an object appears whole or not at all)."""
    backend, bucket, key = store(uri)
    try:
        backend.put(bucket, key, data)
    except Exception as exc:
        raise SourceError(f"{uri}: upload failed: {exc}") from exc


def create_object(uri: str, data: bytes) -> str:
    """Write `data` to the object `uri` only if no object is there (a conditional write on the store, so two
    writers cannot both succeed); ObjectExists when one is. Returns the version token (as `read_object`)."""
    backend, bucket, key = store(uri)
    try:
        return backend.create(bucket, key, data)
    except ObjectExists:
        raise
    except Exception as exc:
        raise SourceError(f"{uri}: upload failed: {exc}") from exc


def read_object(uri: str, limit: int = 1 << 20) -> tuple[bytes, str]:
    """An object's bytes, read into memory (at most `limit`, else SourceError: no more than `limit` + 1 bytes
    are ever fetched), and a token naming this version of it, for `replace_object`."""
    backend, bucket, key = store(uri)
    try:
        data, token = backend.read(bucket, key, limit)
    except Exception as exc:
        raise SourceError(f"{uri}: read failed: {exc}") from exc
    if len(data) > limit:
        raise SourceError(f"{uri}: above the limit of {limit} bytes")
    return data, token


def replace_object(uri: str, data: bytes, token: str) -> None:
    """Overwrite `uri` only if it is still the version `read_object` returned `token` for (S3 If-Match, GCS
    generation match): of two writers that read the same version, one wins; ObjectChanged for the other."""
    backend, bucket, key = store(uri)
    try:
        backend.replace(bucket, key, data, token)
    except ObjectChanged:
        raise
    except Exception as exc:
        raise SourceError(f"{uri}: upload failed: {exc}") from exc


def delete_object(uri: str) -> None:
    """Remove the object `uri` (s3://bucket/key or gs://bucket/key)."""
    backend, bucket, key = store(uri)
    try:
        backend.delete(bucket, key)
    except Exception as exc:
        raise SourceError(f"{uri}: delete failed: {exc}") from exc


def fetch_prefix(uri: str, cache_dir: Path, accept: Callable[[str, int], object] | None = None) -> Path:
    """A local folder holding the objects under `uri`, downloaded once per content version. `accept(name,
    size)` is called for every object (its name relative to `uri`) before anything is downloaded, and may
    raise to refuse the prefix.

    Concurrent callers on one machine (two Ray workers of a node) share one download: the first downloads
    into a folder of its own while holding the cache entry's file lock and publishes it with an atomic
    rename, so a folder in the cache is always complete; the others wait on the lock and find it."""
    from filelock import FileLock

    if not is_remote(uri):
        if "://" in uri:
            store(uri)  # names the unsupported scheme
        path = Path(uri).expanduser()
        if not path.exists():
            raise SourceError(f"{uri}: no such file or folder")
        return path
    scheme, bucket, prefix = split_uri(uri)
    objects = list_objects(uri)
    for obj in objects:
        rel = obj.key[len(prefix):].lstrip("/") if prefix else obj.key
        if not rel or escapes_folder(rel):
            raise SourceError(f"{scheme}://{bucket}/{obj.key}: the object key escapes the prefix {uri} "
                              f"(an absolute path or '..'); refusing to write it outside the cache")
        if accept is not None:
            accept(rel, obj.size)
    digest = hashlib.sha256("\n".join(f"{o.key}\t{o.size}\t{o.etag}" for o in sorted(objects, key=lambda o: o.key)).encode())
    dest = cache_dir / "remote" / digest.hexdigest()[:24]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if dest.is_dir():
            log.info("%s: cached in %s", uri, dest)
            return dest
        log.info("%s: downloading %d objects (%.1f MB) to %s", uri, len(objects), sum(o.size for o in objects) / 1e6, dest)
        tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.partial-", dir=dest.parent))
        try:
            for obj in objects:
                download_object(uri, obj.key, tmp / (obj.key[len(prefix):].lstrip("/") if prefix else obj.key))
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}-{threading.get_ident()}")  # this caller's own
    scheme = uri.split("://", 1)[0]
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri, timeout=60) as resp, open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out)
        except OSError as exc:
            raise SourceError(f"{uri}: download failed: {exc}") from exc
    else:
        _, _, key = store(uri)  # SourceError names an unsupported scheme
        download_object(uri, key, tmp)
    os.replace(tmp, dest)  # atomic: a reader sees the whole file or none
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
