"""Signed serving packages: the release step signs SHA256SUMS with an Ed25519 key; the predictor, given the
public keys, serves only packages one of them signed (real keys, real `cryptography`, the real CLI)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from pathlib import Path

import google_crc32c
import pytest

from serving.predictor import MaskRCNNPredictor
from maskrcnn.package import CHECKSUM_FILE, SIGNATURE_FILE, PackageError, open_package
from maskrcnn.signature import SignatureError, key_id, load_private_key, load_public_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs, written by the release command's own keygen."""
    from release.__main__ import main

    folder = tmp_path_factory.mktemp("keys")
    for name in ("current", "other"):
        assert main(["keygen", str(folder / f"{name}.key"), str(folder / f"{name}.pem")]) == 0
    return folder


def _signed(serving_package, folder: Path, key_file: Path) -> Path:
    open_package(serving_package).signed(load_private_key(key_file)).save(folder)
    return folder


def test_keygen_writes_an_owner_only_private_key_and_never_overwrites_it(keys):
    from release.__main__ import main

    assert stat.S_IMODE(os.stat(keys / "current.key").st_mode) == 0o600
    before = (keys / "current.key").read_bytes()
    assert main(["keygen", str(keys / "current.key"), str(keys / "x.pem")]) == 2
    assert (keys / "current.key").read_bytes() == before
    assert key_id(load_public_keys(keys / "current.pem")[0]) == key_id(load_private_key(keys / "current.key").public_key())


def test_a_signed_package_is_served_and_names_its_key(serving_package, keys, tmp_path):
    package = _signed(serving_package, tmp_path / "signed", keys / "current.key")
    predictor = MaskRCNNPredictor("maskrcnn", str(package), public_keys=keys / "current.pem")
    assert predictor.load() and predictor.ready
    assert predictor.signer == key_id(load_public_keys(keys / "current.pem")[0])


@pytest.mark.parametrize("case", ["unsigned", "signed by another key", "checksums changed after signing",
                                  "signature garbled"])
def test_a_package_not_signed_by_a_trusted_key_is_refused(serving_package, keys, tmp_path, case):
    folder = _signed(serving_package, tmp_path / "pkg", keys / ("other.key" if case == "signed by another key" else "current.key"))
    if case == "unsigned":
        (folder / SIGNATURE_FILE).unlink()
    elif case == "checksums changed after signing":  # a re-stamped package (metadata changed) keeps an old signature
        shutil.copy(folder / SIGNATURE_FILE, tmp_path / "sig")
        open_package(folder).stamped({"model_version": "666"}).save(folder)
        shutil.copy(tmp_path / "sig", folder / SIGNATURE_FILE)
    elif case == "signature garbled":
        (folder / SIGNATURE_FILE).write_text('{"algorithm": "ed25519", "signature": "!!"}')
    rule = {"unsigned": r"SHA256SUMS\.sig: missing; this predictor trusts only signed packages",
            "signed by another key": r"SHA256SUMS\.sig: the signature \(by key [0-9a-f]{16}\) does not verify against any "
                                     r"trusted key",
            "checksums changed after signing": r"SHA256SUMS\.sig: the signature .* does not verify",
            "signature garbled": r"SHA256SUMS\.sig: not a signature document"}[case]
    predictor = MaskRCNNPredictor("maskrcnn", str(folder), public_keys=keys / "current.pem")
    with pytest.raises(PackageError, match=rule):
        predictor.load()
    assert not predictor.ready
    # without a configured key, signatures are not checked (and the log says so)
    if case != "signature garbled":
        assert MaskRCNNPredictor("maskrcnn", str(folder)).load()


def test_rotation_trusts_every_key_in_the_configmap_folder(serving_package, keys, tmp_path):
    """Rotation: the ConfigMap holds the old and the new public key while packages signed by either are
    served; removing the old key then refuses packages only it signed."""
    configmap = tmp_path / "configmap"
    configmap.mkdir()
    shutil.copy(keys / "current.pem", configmap / "current.pem")
    shutil.copy(keys / "other.pem", configmap / "previous.pem")
    old = _signed(serving_package, tmp_path / "old", keys / "other.key")
    new = _signed(serving_package, tmp_path / "new", keys / "current.key")
    for folder in (old, new):
        assert MaskRCNNPredictor("maskrcnn", str(folder), public_keys=configmap).load()
    (configmap / "previous.pem").unlink()
    with pytest.raises(PackageError, match="does not verify against any trusted key"):
        MaskRCNNPredictor("maskrcnn", str(old), public_keys=configmap).load()
    # one PEM file with both keys works the same way
    (tmp_path / "both.pem").write_bytes((keys / "current.pem").read_bytes() + (keys / "other.pem").read_bytes())
    assert len(load_public_keys(tmp_path / "both.pem")) == 2


def test_bad_key_files_are_named(tmp_path, keys):
    (tmp_path / "empty.pem").write_text("nothing here\n")
    with pytest.raises(SignatureError, match=r"empty\.pem: no PEM public key"):
        load_public_keys(tmp_path / "empty.pem")
    with pytest.raises(SignatureError, match=r"current\.pem: not an unencrypted PEM private key"):
        load_private_key(keys / "current.pem")
    with pytest.raises(SignatureError, match=r"missing\.key: cannot read the key file"):
        load_private_key(tmp_path / "missing.key")


def test_the_serving_command_refuses_an_unsigned_package_and_exits(serving_package, keys, tmp_path, caplog):
    """`uv run -m serving --public-keys ...` on an unsigned package: it never listens, and says why."""
    from serving.__main__ import main

    assert main(["--model-dir", str(serving_package), "--public-keys", str(keys / "current.pem"),
                 "--host", "127.0.0.1", "--http-port", "1"]) == 1
    assert "SHA256SUMS.sig: missing" in caplog.text
    assert (Path(serving_package) / CHECKSUM_FILE).exists()


def test_with_keys_nothing_of_an_unsigned_package_is_parsed(serving_package, keys, monkeypatch):
    """The signature is checked before the weights are unpickled or the YAML is read: a package nobody
    trusted signed never reaches the parsers."""
    from maskrcnn import package as package_module

    def never(*args, **kwargs):
        raise AssertionError("an unsigned package was parsed")

    for parser in ("_weights", "parse_config", "parse_label_map", "_probe"):
        monkeypatch.setattr(package_module, parser, never)
    with pytest.raises(PackageError, match=r"SHA256SUMS\.sig: missing"):
        open_package(serving_package, public_keys=load_public_keys(keys / "current.pem"))


def test_a_signed_package_replayed_under_another_version_is_refused(serving_package, keys, tmp_path):
    """v7, validly signed, copied to where v9 should be (someone with write access to the bucket, no key):
    the predictor told by the release which version and digest to serve (the InferenceService's annotations,
    passed in by the ServingRuntime) refuses it; the real v9 is served."""
    from release.promote import promised
    from maskrcnn.package import DIGEST_ANNOTATION, VERSION_ANNOTATION

    key = load_private_key(keys / "current.key")
    v7 = open_package(serving_package).stamped({"model_version": "7"}).signed(key)
    v9 = open_package(serving_package).stamped({"model_version": "9"}).signed(key)
    v7.save(tmp_path / "v9")  # the replay: a signed v7 where v9 belongs
    promise = promised("9", v9.digest)
    assert promise == {VERSION_ANNOTATION: "9", DIGEST_ANNOTATION: v9.digest} and v7.digest != v9.digest
    for version, digest, refused in (("9", v9.digest, "is model version 7"), ("", v9.digest, "digest"),
                                     ("9", "", "is model version 7")):
        replayed = MaskRCNNPredictor("maskrcnn", str(tmp_path / "v9"), public_keys=keys / "current.pem",
                                     expect_version=version, expect_digest=digest)
        with pytest.raises(PackageError, match=refused):
            replayed.load()
        assert not replayed.ready
    real = MaskRCNNPredictor("maskrcnn", str(v9.save(tmp_path / "real-v9")), public_keys=keys / "current.pem",
                             expect_version="9", expect_digest=v9.digest)
    assert real.load() and real.version == "9"
    with pytest.raises(ValueError, match="expected digest: sha256:<64 hex digits>"):
        MaskRCNNPredictor("maskrcnn", str(tmp_path / "v9"), expect_digest="md5:abc")


def test_an_empty_public_keys_flag_appended_to_the_runtimes_fails_closed(serving_package, keys, tmp_path, caplog):
    """KServe appends an InferenceService's args to its ServingRuntime's: `--public-keys ""` added there
    used to win (argparse's last value) and turn verification off. An empty value is refused, and every
    key source given is trusted at once (a key in either verifies; an unsigned package is still refused)."""
    from serving.__main__ import main, public_key_sources

    runtime = ["--model-dir", str(serving_package), "--host", "127.0.0.1", "--http-port", "1",
               "--public-keys", str(keys / "current.pem")]
    assert main([*runtime, "--public-keys", ""]) == 2
    assert "an empty value would turn signature checks off" in caplog.text
    assert public_key_sources([str(keys / "current.pem"), str(keys / "other.pem")]) == [str(keys / "current.pem"),
                                                                                        str(keys / "other.pem")]
    caplog.clear()
    assert main([*runtime, "--public-keys", str(keys / "other.pem")]) == 1  # unsigned: still refused
    assert "SHA256SUMS.sig: missing" in caplog.text
    by_other = _signed(serving_package, tmp_path / "by-other", keys / "other.key")
    both = MaskRCNNPredictor("maskrcnn", str(by_other), public_keys=[keys / "current.pem", keys / "other.pem"])
    assert both.load() and both.signer == key_id(load_public_keys(keys / "other.pem")[0])


class KmsStandIn:
    """A stand-in for Cloud KMS's REST API (Cloud KMS cannot run here), serving on 127.0.0.1 the two calls a
    signer makes, as KMS's v1 API reference describes them: `GET /v1/{keyVersion}/publicKey` (`pem`,
    `algorithm`, `pemCrc32c`) and `POST /v1/{keyVersion}:asymmetricSign` (request `data`, `dataCrc32c`;
    answer `signature`, `signatureCrc32c`, `verifiedDataCrc32c`, `name`), with a real Ed25519 key.
    `corrupt`: answer with a signature whose CRC32C does not match (a corrupted answer)."""

    def __init__(self, name: str):
        import threading
        from http.server import ThreadingHTTPServer

        from kfp_stand_in import JsonHandler

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.name, self.key, self.corrupt, self.calls = name, Ed25519PrivateKey.generate(), False, []
        stand_in = self

        class Handler(JsonHandler):
            def do_GET(self):  # noqa: N802
                stand_in.calls.append(("GET", self.path))
                if self.path != f"/v1/{stand_in.name}/publicKey":
                    return self._answer(404, {"error": {"code": 404, "status": "NOT_FOUND"}})
                pem = stand_in.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)
                self._answer(200, {"pem": pem.decode(), "algorithm": "EC_SIGN_ED25519", "name": stand_in.name,
                                   "pemCrc32c": str(google_crc32c.value(pem)), "protectionLevel": "SOFTWARE"})

            def do_POST(self):  # noqa: N802
                stand_in.calls.append(("POST", self.path))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != f"/v1/{stand_in.name}:asymmetricSign":
                    return self._answer(404, {"error": {"code": 404, "status": "NOT_FOUND"}})
                data = base64.b64decode(body["data"])
                signature = stand_in.key.sign(data)
                crc = google_crc32c.value(signature) + (1 if stand_in.corrupt else 0)
                if stand_in.corrupt == "types":  # a garbled answer: wrong JSON types where numbers and text belong
                    return self._answer(200, {"signature": ["x"], "signatureCrc32c": {"a": 1}, "name": stand_in.name,
                                              "verifiedDataCrc32c": True})
                self._answer(200, {"signature": base64.b64encode(signature).decode(), "signatureCrc32c": str(crc),
                                   "verifiedDataCrc32c": int(body["dataCrc32c"]) == google_crc32c.value(data),
                                   "name": stand_in.name, "protectionLevel": "SOFTWARE"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_package_signed_in_cloud_kms_is_served_and_a_corrupted_answer_is_refused(serving_package, tmp_path, monkeypatch):
    """`gcpkms://...` as the signing key: the package is signed by KMS (the stand-in), the signature document
    names its key, and the predictor given its public key serves it; a corrupted answer signs nothing."""
    from cryptography.hazmat.primitives import serialization

    from maskrcnn.kms import ENDPOINT_ENV, KmsError

    name = "projects/p/locations/us-central1/keyRings/r/cryptoKeys/packages/cryptoKeyVersions/1"
    kms = KmsStandIn(name)
    monkeypatch.setenv(ENDPOINT_ENV, kms.url)
    signer = load_private_key(f"gcpkms://{name}")
    signed = open_package(serving_package).stamped({"model_version": "3"}).signed(signer)
    assert signed.signer == key_id(kms.key.public_key()) and ("POST", f"/v1/{name}:asymmetricSign") in kms.calls
    public = tmp_path / "kms.pem"
    public.write_bytes(kms.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    served = MaskRCNNPredictor("maskrcnn", str(signed.save(tmp_path / "pkg")), public_keys=public)
    assert served.load() and served.signer == key_id(kms.key.public_key())
    kms.corrupt = True
    with pytest.raises(KmsError, match="the signature arrived corrupted"):
        open_package(serving_package).signed(load_private_key(f"gcpkms://{name}"))
    kms.corrupt = "types"
    with pytest.raises(KmsError, match="not a signature answer"):
        open_package(serving_package).signed(load_private_key(f"gcpkms://{name}"))
    with pytest.raises(SignatureError, match="expected gcpkms://projects/P/locations/L"):
        load_private_key("gcpkms://projects/p/keyRings/r")
