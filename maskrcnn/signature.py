"""Ed25519 signatures over a serving package's `SHA256SUMS`: who vouches for the package.

`SHA256SUMS` names every file of a package with its SHA-256, so one signature over its bytes covers
them all. The release step signs the package it scored (`release.promote`, with a private key from a
Kubernetes Secret); the predictor verifies the signature against the public keys it is given (a
ConfigMap) before it reports ready, and refuses unsigned or wrongly signed packages when any key is
configured.

`SHA256SUMS.sig` is a small JSON document: `{"algorithm": "ed25519", "key_id": ..., "signature": base64}`.
`key_id` (the first 16 hex digits of the SHA-256 of the raw public key) only names the key in messages
and picks it among several: the signature itself is what is checked. Several public keys may be
trusted at once (a PEM file holding several keys, or a folder of `*.pem` files as a ConfigMap mounts
them), so that a key can be rotated without a moment when valid packages are refused.

Why not OpenSSF `model-signing`: its default flow signs through Sigstore's public services (Fulcio,
Rekor), which a cluster without egress cannot reach, and its key-based flow adds a dependency tree for
what one Ed25519 signature over a checksum list already gives. The checksum list is the same manifest
idea, in `sha256sum -c` form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from maskrcnn.names import PUBLIC_KEYS_ENV

ALGORITHM = "ed25519"
MAX_KEY_FILE_BYTES = 64 << 10
PEM_PUBLIC = b"-----BEGIN PUBLIC KEY-----"


class SignatureError(ValueError):
    """A signature is missing, malformed or does not verify; or a key file cannot be read."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: str | Path, public_path: str | Path) -> str:
    """Write a new Ed25519 key pair as PEM (the private key readable by its owner only, from the first
    byte); returns the key id. Refuses to overwrite an existing private key."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem)
    Path(public_path).write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(key.public_key())


def _read_key_file(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE_BYTES:
            raise SignatureError(f"{path}: {size} bytes; a key file holds at most {MAX_KEY_FILE_BYTES}")
        return path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read the key file: {exc.strerror or exc}") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An unencrypted PKCS#8 PEM Ed25519 private key (as `generate_keypair` writes it), or, for
    `gcpkms://...`, a key version in Cloud KMS that signs in its place (`maskrcnn.kms.KmsSigner`)."""
    if str(path).startswith("gcpkms://"):
        from maskrcnn.kms import KmsSigner

        try:
            return KmsSigner(str(path))  # type: ignore[return-value]  # it signs as the private key would
        except ValueError as exc:
            raise SignatureError(str(exc)) from None
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(_read_key_file(path), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: a {type(key).__name__}; expected an Ed25519 private key")
    return key


def public_key_sources(given: list[str] | None) -> list[str]:
    """The key files or folders to trust: the flags given, else $MASKRCNN_PUBLIC_KEYS; ValueError on an empty
    one (fail closed: a runtime that names keys is never turned off by an appended empty flag)."""
    if given is None:
        env = os.environ.get(PUBLIC_KEYS_ENV, "")
        return [env] if env else []
    if any(not value.strip() for value in given):
        raise ValueError(f"--public-keys {given}: an empty value would turn signature checks off; refused (drop the "
                         f"flag to serve unsigned packages where no key is configured)")
    return given


def load_public_keys(path: str | Path) -> list[Ed25519PublicKey]:
    """Every Ed25519 public key in a PEM file (one or several keys), or in the `*.pem` files of a folder
    (a ConfigMap mounted as a volume). Raises SignatureError when none is found."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.name.endswith(".pem") and p.is_file()) if path.is_dir() else [path]
    keys: list[Ed25519PublicKey] = []
    for file in files:
        text = _read_key_file(file)
        for n, block in enumerate(text.split(PEM_PUBLIC)[1:], 1):
            try:
                key = serialization.load_pem_public_key(PEM_PUBLIC + block)
            except ValueError as exc:
                raise SignatureError(f"{file}: public key {n} is not valid PEM ({exc})") from None
            if not isinstance(key, Ed25519PublicKey):
                raise SignatureError(f"{file}: public key {n} is a {type(key).__name__}; expected Ed25519")
            keys.append(key)
    if not keys:
        raise SignatureError(f"{path}: no PEM public key ('{PEM_PUBLIC.decode()}') found")
    return keys


def sign(message: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The signature document (`SHA256SUMS.sig`'s bytes) of `message`."""
    doc = {"algorithm": ALGORITHM, "key_id": key_id(private_key.public_key()),
           "signature": base64.b64encode(private_key.sign(message)).decode()}
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


def verify(message: bytes, document: bytes | None, keys: list[Ed25519PublicKey], where: str) -> str:
    """Check the signature document over `message` against the trusted `keys`; returns the id of the key
    that signed. `where` names the signature file in errors."""
    if document is None:
        raise SignatureError(f"{where}: missing; this predictor trusts only signed packages (keys "
                             f"{', '.join(key_id(k) for k in keys)})")
    try:
        doc = json.loads(document)
        if not isinstance(doc, dict) or doc.get("algorithm") != ALGORITHM:
            raise ValueError(f"expected {{\"algorithm\": \"{ALGORITHM}\", ...}}")
        signature = base64.b64decode(str(doc["signature"]), validate=True)
    except (ValueError, KeyError, binascii.Error) as exc:
        raise SignatureError(f"{where}: not a signature document ({exc})") from None
    for key in keys:
        try:
            key.verify(signature, message)
            return key_id(key)
        except InvalidSignature:
            continue
    raise SignatureError(f"{where}: the signature (by key {str(doc.get('key_id', '?'))[:16]}) does not verify "
                         f"against any trusted key ({', '.join(key_id(k) for k in keys)})")
