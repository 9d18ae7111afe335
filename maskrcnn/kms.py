"""Sign serving packages with an Ed25519 key held in Cloud KMS (`gcpkms://projects/P/locations/L/keyRings/R/
cryptoKeys/K/cryptoKeyVersions/N`), instead of a key file: the private key never leaves KMS, and who may
sign is an IAM binding (infra/gke/release_keys.tf grants the pipeline's account `roles/cloudkms.signer`).

`KmsSigner` stands where `maskrcnn.signature.sign` expects an `Ed25519PrivateKey`: `.sign(message)` calls
KMS's `asymmetricSign` with the message itself (Ed25519 signs messages, not digests), with the CRC32C
checks KMS's documentation asks of clients, and checks the signature against the key's public key before
using it; `.public_key()` is `getPublicKey`'s PEM. Credentials are Google's application defaults (Workload
Identity in a pod); `$MASKRCNN_KMS_ENDPOINT` points at another endpoint without credentials (a test's).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from maskrcnn.waiting import connection_error, retry_call

SCHEME = "gcpkms://"
ENDPOINT_ENV = "MASKRCNN_KMS_ENDPOINT"
DEFAULT_ENDPOINT = "https://cloudkms.googleapis.com"
KEY_VERSION = re.compile(r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+/cryptoKeyVersions/\d+")


class KmsError(RuntimeError):
    """Cloud KMS refused or garbled a request (the message names the key version and what failed)."""


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(data)


class KmsSigner:
    """An Ed25519 key version in Cloud KMS, usable as `maskrcnn.signature.sign`'s private key."""

    def __init__(self, uri: str, session: Any = None):
        name = uri.removeprefix(SCHEME)
        if not uri.startswith(SCHEME) or not KEY_VERSION.fullmatch(name):
            raise ValueError(f"KMS key {uri!r}: expected {SCHEME}projects/P/locations/L/keyRings/R/cryptoKeys/K/"
                             f"cryptoKeyVersions/N")
        self.name, self.uri = name, uri
        self.endpoint = os.environ.get(ENDPOINT_ENV, "").rstrip("/") or DEFAULT_ENDPOINT
        self._session = session
        self._public: Ed25519PublicKey | None = None

    @property
    def session(self) -> Any:
        if self._session is None:
            import google.auth
            from google.auth.credentials import AnonymousCredentials
            from google.auth.transport.requests import AuthorizedSession

            credentials = (AnonymousCredentials() if os.environ.get(ENDPOINT_ENV) else
                           google.auth.default(scopes=["https://www.googleapis.com/auth/cloudkms"])[0])
            self._session = AuthorizedSession(credentials)
        return self._session

    def _call(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        def once() -> dict[str, Any]:
            answer = self.session.request(method, f"{self.endpoint}/v1/{path}", json=body, timeout=30)
            if answer.status_code >= 400:
                error = ConnectionError if answer.status_code in (429, 500, 502, 503, 504) else KmsError
                raise error(f"{self.uri}: KMS answered {answer.status_code}: {answer.text[:300]}")
            try:
                return answer.json()
            except ValueError:
                raise KmsError(f"{self.uri}: KMS answered something other than JSON: {answer.text[:200]!r}") from None

        try:
            return retry_call(once, what=f"KMS {path.rsplit('/', 1)[-1]}", transient=connection_error)
        except ConnectionError as exc:
            raise KmsError(str(exc)) from exc

    def public_key(self) -> Ed25519PublicKey:
        if self._public is None:
            doc = self._call("GET", f"{self.name}/publicKey")
            if not isinstance(doc, dict) or doc.get("algorithm") != "EC_SIGN_ED25519":
                raise KmsError(f"{self.uri}: not an EC_SIGN_ED25519 key ({str(doc)[:200]}); packages are signed with "
                               f"Ed25519")
            pem = str(doc.get("pem", "")).encode()
            try:
                if "pemCrc32c" in doc and int(str(doc["pemCrc32c"])) != _crc32c(pem):
                    raise KmsError(f"{self.uri}: the public key arrived corrupted (CRC32C mismatch)")
                key = serialization.load_pem_public_key(pem)
            except ValueError as exc:
                raise KmsError(f"{self.uri}: getPublicKey answered no valid PEM ({exc})") from None
            if not isinstance(key, Ed25519PublicKey):
                raise KmsError(f"{self.uri}: getPublicKey returned a {type(key).__name__}")
            self._public = key
        return self._public

    def sign(self, message: bytes) -> bytes:
        doc = self._call("POST", f"{self.name}:asymmetricSign",
                         {"data": base64.b64encode(message).decode(), "dataCrc32c": str(_crc32c(message))})
        if not isinstance(doc, dict) or doc.get("name") != self.name or doc.get("verifiedDataCrc32c") is not True:
            raise KmsError(f"{self.uri}: the request arrived corrupted or was answered for another key")
        try:
            signature = base64.b64decode(str(doc.get("signature", "")), validate=True)
            crc = int(str(doc.get("signatureCrc32c", "-1")))
        except (binascii.Error, ValueError):
            raise KmsError(f"{self.uri}: not a signature answer ({str(doc)[:200]})") from None
        if crc != _crc32c(signature):
            raise KmsError(f"{self.uri}: the signature arrived corrupted (CRC32C mismatch)")
        try:
            self.public_key().verify(signature, message)
        except InvalidSignature:
            raise KmsError(f"{self.uri}: KMS's signature does not verify against the key's public key") from None
        return signature
