"""The serving package: the one model artifact, as a value with one reader and one writer.

Training logs it to MLflow as the run's model, the registry's versions point to it, evaluation and the
release gate score it, the release step signs and publishes it, and KServe's predictor serves it. All
of them go through `open_package` (the reader) and `training.export.write_package` (the writer); nothing else opens a
package's files by name.

A package is a folder of regular files (format 1):

| file | what | limit |
|---|---|---|
| `model.pt` | the model's `state_dict` (torch zip, records stored uncompressed; loads as weights only) | 2 GiB |
| `config.yaml` | the training config: architecture, pre- and post-processing (`eval.mask_threshold`) | 64 KiB |
| `label_map.json` | labels 1..K -> category id and name; K + 1 must be the head's outputs | 1 MiB |
| `metadata.json` | `format_version` and the evidence (run, metrics, dataset hash, commit, version) | 1 MiB |
| `probe.npz` | a few network inputs and the detections the weights give on them (`Probe`) | 256 MiB |
| `detector.onnx` | optional: the network as a self-contained ONNX graph, run by ONNX Runtime | 2 GiB |
| `reference.json` | optional: the inputs' and predictions' statistics on the validation split (`maskrcnn.reference`) | 1 MiB |
| `MODEL_CARD.md` | optional: the model card, UTF-8 Markdown (`training.model_card`) | 256 KiB |
| `SHA256SUMS` | `sha256sum` lines over every file above (`sha256sum -c SHA256SUMS` checks by hand) | 64 KiB |
| `SHA256SUMS.sig` | optional: an Ed25519 signature over `SHA256SUMS` (`maskrcnn.signature`) | 4 KiB |

The reader verifies once and keeps the bytes it verified: each file is read once (no symlink
followed, nothing but regular files), hashed from those bytes, and parsed from them. It refuses, with
an error naming the file and the rule, anything else in the folder, a missing, duplicate or malformed
`SHA256SUMS` line, a file over its limit, a compressed or oversized `model.pt`, YAML with aliases or
over its size, config values outside their documented ranges, a label map that does not match the
head, a graph that is not self-contained (`maskrcnn.onnx_runtime.check_graph`), an unsupported
`format_version`, and, when public keys are given, a missing or wrong signature.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import yaml

from maskrcnn import names
from maskrcnn.config import Config, ConfigError
from maskrcnn.labels import LabelError, LabelMap
from maskrcnn.onnx_runtime import ONNX_FILE, GraphError, OnnxDetector, Probe, check_graph
from maskrcnn.reference import REFERENCE_FILE, Reference, ReferenceError, parse_reference

if TYPE_CHECKING:
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from maskrcnn.eager import EagerNetwork

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BACKENDS = ("auto", "onnxruntime", "eager")  # `Package.network`
SUPPORTED_FORMATS = (1,)
CHECKSUM_FILE = "SHA256SUMS"
# What a release promises the predictor, as annotations on the InferenceService (KServe propagates them to
# the predictor's pods; the ServingRuntime passes them in through the downward API): the version and the
# package's digest. `release.promote` writes them with the storageUri; `serving` refuses any other package.
VERSION_ANNOTATION = "release.maskrcnn.io/model-version"
DIGEST_ANNOTATION = "release.maskrcnn.io/package-digest"
SIGNATURE_FILE = "SHA256SUMS.sig"
CARD_FILE = "MODEL_CARD.md"  # training.model_card writes it
MAX_CARD_BYTES = 256 << 10


@dataclass(frozen=True)
class FileRule:
    max_bytes: int
    required: bool


FILES: dict[str, FileRule] = {  # the package's file contract: one table
    "model.pt": FileRule(2 << 30, True),
    "config.yaml": FileRule(64 << 10, True),
    "label_map.json": FileRule(1 << 20, True),
    "metadata.json": FileRule(1 << 20, True),
    "probe.npz": FileRule(256 << 20, True),
    ONNX_FILE: FileRule(2 << 30, False),
    REFERENCE_FILE: FileRule(1 << 20, False),
    CARD_FILE: FileRule(MAX_CARD_BYTES, False),
}
UNLISTED = {CHECKSUM_FILE: 64 << 10, SIGNATURE_FILE: 4 << 10}  # not in SHA256SUMS: it lists, or signs, the rest
MAX_YAML_ALIASES = 0  # safe_dump writes none; every alias is another's bytes read again
CHECKSUM_LINE = re.compile(r"([0-9a-f]{64})  ([A-Za-z0-9._-]{1,128})")
EAGER_IMAGE = os.environ.get("MASKRCNN_EAGER_IMAGE", "the platform image (the Dockerfile's `platform` target)")
"""What serves a package without a graph, named by the lean serving image's refusal (its ENV sets it)."""
HEAD_WEIGHTS = ("roi_heads.box_predictor.cls_score.weight", "roi_heads.mask_predictor.mask_fcn_logits.weight")


class PackageError(RuntimeError):
    """A serving package that cannot be served; the message names the file and the rule it breaks."""


@dataclass(frozen=True)
class Package:
    """A verified serving package: its files' bytes and what they hold. Build one with `open_package`
    (from a folder or bucket) or `write_package` (from a model); `stamped` and `signed` return new values."""

    files: Mapping[str, bytes]
    """Every listed file's verified bytes, by name (`SHA256SUMS` and its signature included)."""
    config: Config
    label_map: LabelMap
    metadata: dict[str, Any]
    weights: dict[str, torch.Tensor] | None
    """The state_dict; None when opened without it (`open_package(weights=...)`): `build_model` loads it then."""
    probe: Probe
    source: str = ""
    """Where it was read from (for messages)."""
    signer: str = ""
    """Id of the trusted key that verified the signature; empty when not checked."""
    reference: Reference | None = None
    """The inputs' and predictions' statistics on the validation split (`maskrcnn.reference`), if it has them."""

    @property
    def checksums(self) -> dict[str, str]:
        """File name -> SHA-256, as `SHA256SUMS` lists them."""
        return parse_checksums(self.files[CHECKSUM_FILE], CHECKSUM_FILE)

    @property
    def digest(self) -> str:
        """`sha256:<hex>` of `SHA256SUMS`: one value that names every file's bytes (what the gate scored,
        what is published, what the predictor is told to expect)."""
        return "sha256:" + hashlib.sha256(self.files[CHECKSUM_FILE]).hexdigest()

    @property
    def graph(self) -> bytes | None:
        """`detector.onnx`'s bytes, checked by `check_graph`, or None when the package has no graph."""
        return self.files.get(ONNX_FILE)

    @property
    def version(self) -> str:
        """The registered model version (or the run id before registration; "" when neither)."""
        return str(self.metadata.get("model_version") or self.metadata.get("mlflow_run_id") or "")

    def build_model(self) -> torch.nn.Module:
        """The architecture rebuilt from the config with the weights loaded, in eval mode on the CPU. Initial
        weights named in the config are never fetched (a training-only step)."""
        weights = self.weights
        if weights is None:  # opened without them: loaded and checked as `open_package` would have
            weights = _weights(self.files["model.pt"], f"{self.where}/model.pt")
            _check_head(weights, "model.pt", self.label_map, f"{self.where}/label_map.json")
        from maskrcnn.model import build_model

        model = build_model(self.config.model, self.label_map.num_classes)
        model.load_state_dict(weights)
        return model.eval()

    @property
    def where(self) -> str:
        return self.source.rstrip("/") or "."

    def save(self, folder: str | Path) -> Path:
        """Write the files into `folder` (created; files of another package there are replaced)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in [*FILES, *UNLISTED]:
            if name not in self.files:
                (folder / name).unlink(missing_ok=True)
        for name, data in self.files.items():
            (folder / name).write_bytes(data)
        return folder

    def stamped(self, updates: dict[str, Any]) -> Package:
        """The same package with `updates` merged into its metadata (e.g. final metrics, the registered
        version); the weights, config, label map, graph and probe stay byte-identical. Unsigned."""
        metadata = json.loads(metadata_bytes({**self.metadata, **updates}))  # as a reader will see it
        files = with_checksums({**self.files, "metadata.json": metadata_bytes(metadata)})
        return dataclasses.replace(self, files=files, metadata=metadata, signer="")

    def with_reference(self, reference: Reference) -> Package:
        """The same package carrying `reference` as reference.json; every other file byte-identical. Unsigned."""
        files = with_checksums({**self.files, REFERENCE_FILE: reference.to_json()})
        parsed = parse_reference(files[REFERENCE_FILE], REFERENCE_FILE, self.label_map.names)  # as a reader will see it
        return dataclasses.replace(self, files=files, reference=parsed, signer="")

    @property
    def card(self) -> str | None:
        """The model card (`MODEL_CARD.md`), if the package has one."""
        return self.files[CARD_FILE].decode() if CARD_FILE in self.files else None

    def with_card(self, card: str) -> Package:
        """The same package carrying `card` as MODEL_CARD.md; every other file byte-identical. Unsigned."""
        files = with_checksums({**self.files, CARD_FILE: card.encode()})
        _card_text(files[CARD_FILE], CARD_FILE)
        return dataclasses.replace(self, files=files, signer="")

    @classmethod
    def from_files(cls, files: dict[str, bytes], source: str = "", public_keys: list[Ed25519PublicKey] | None = None,
                   weights: bool | None = True) -> Package:
        """A package from its files' bytes (name -> bytes, e.g. as `files` of another `Package` travels to a Ray
        actor), verified as `open_package` verifies a folder: nothing is written to disk to be read again."""
        for name, data in files.items():
            _check_entry(f"{source.rstrip('/') or '.'}/{name}", name, len(data))
        return _from_files(dict(files), source, public_keys, weights)

    def network(self, backend: str = "auto", device: str = "cpu", threads: int | None = None,
                probe_timeout_s: float = 600.0) -> OnnxDetector | EagerNetwork:
        """THE one way a stage (the predictor, batch, evaluation) turns the package into a network: the graph
        in ONNX Runtime (`onnxruntime`; `auto` when the package has one) or the weights in eager PyTorch
        (`eager`; `auto` without a graph), on `threads` intra-op threads (default: every core) and `device`,
        and run on the package's probe: a network that does not answer as the weights did at export is
        refused (PackageError). The result's `run(images, image_size)` is what `maskrcnn.processing.detect` runs."""
        if backend not in BACKENDS:
            raise PackageError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        if backend == "onnxruntime" and self.graph is None:
            raise PackageError(f"{self.where}: backend onnxruntime needs the package's {ONNX_FILE}, and it has none "
                               f"(re-export it with `uv run -m training.export`, or use backend eager)")
        threads = threads or os.cpu_count() or 1
        if backend != "eager" and self.graph is not None:
            network = OnnxDetector(self.graph, threads, device)  # GraphError: not a detector graph, no such device
        else:
            from maskrcnn.eager import EagerNetwork  # torch, only for the eager network

            network = EagerNetwork(self.build_model(), threads, device)
        try:
            problem = self.probe.mismatch(network.run, probe_timeout_s)
        except GraphError as exc:
            problem = str(exc)
        if problem:
            raise PackageError(f"{self.where}: the network does not answer the package's probe as its weights did at "
                               f"export, so it is not used: {problem}")
        return network

    def signed(self, private_key: Ed25519PrivateKey) -> Package:
        """The same package with `SHA256SUMS.sig` by `private_key`."""
        from maskrcnn.signature import key_id, sign

        files = {**self.files, SIGNATURE_FILE: sign(self.files[CHECKSUM_FILE], private_key)}
        return dataclasses.replace(self, files=files, signer=key_id(private_key.public_key()))


def open_package(src: str | Path, public_keys: list[Ed25519PublicKey] | None = None,
                 cache_dir: str | Path | None = None, weights: bool | None = True) -> Package:
    """Read and verify the package at `src` (a folder, `s3://` or `gs://` prefix). With `public_keys`, the
    package must be signed by one of them. Raises PackageError naming the file and the rule.

    `weights`: whether to load `model.pt` (with torch, as weights only) now; None: only when the package has
    no graph, so that a predictor running the graph never imports torch (the head's size is then checked
    on the graph's own tensors, and `build_model` loads the weights if they are ever needed)."""
    from maskrcnn.storage import SourceError, fetch_prefix, is_remote

    where = str(src)
    if is_remote(where):
        base = names.cache_dir(cache_dir)
        try:  # each object named and sized from the listing, before anything is downloaded
            folder = fetch_prefix(where, base / "packages", accept=lambda name, size: _check_entry(f"{where}/{name}", name, size))
        except SourceError as exc:
            raise PackageError(str(exc)) from None
    else:
        folder = Path(src)
    return _from_files(_read_folder(folder), where, public_keys, weights)


def _read_folder(folder: Path) -> dict[str, bytes]:
    """Every entry of `folder`, each a regular file within its limit, read once without following links."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        raise PackageError(f"{folder}: no such package folder") from None
    except NotADirectoryError:
        raise PackageError(f"{folder}: not a folder; a serving package is a folder of files") from None
    files = {}
    for entry in entries:
        path = folder / entry.name
        limit = _check_entry(str(path), entry.name, 0)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            kind = "a symbolic link" if entry.is_symlink() else (exc.strerror or str(exc))
            raise PackageError(f"{path}: {kind}; a package holds regular files only") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise PackageError(f"{path}: not a regular file; a package holds regular files only")
            if info.st_size > limit:
                raise PackageError(f"{path}: {info.st_size} bytes; at most {limit} are allowed")
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read(limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise PackageError(f"{path}: over {limit} bytes; at most {limit} are allowed")
        files[entry.name] = data
    return files


def _check_entry(where: str, name: str, size: int) -> int:
    """A package's entry `name` of `size` bytes: its limit, or PackageError when it does not belong."""
    limit = FILES[name].max_bytes if name in FILES else UNLISTED.get(name)
    if limit is None:
        raise PackageError(f"{where}: not part of a serving package (a package holds {', '.join([*FILES, *UNLISTED])})")
    if size > limit:
        raise PackageError(f"{where}: {size} bytes; at most {limit} are allowed")
    return limit


def parse_checksums(data: bytes, where: str) -> dict[str, str]:
    """`SHA256SUMS`'s lines (`<sha256>  <file>`, as `sha256sum` writes them), each file once."""
    sums: dict[str, str] = {}
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise PackageError(f"{where}: not ASCII text") from None
    if not text.endswith("\n"):
        raise PackageError(f"{where}: expected lines ending in a newline")
    for number, line in enumerate(text[:-1].split("\n"), 1):
        match = CHECKSUM_LINE.fullmatch(line)
        if not match:
            raise PackageError(f"{where} line {number}: expected '<64 lowercase hex digits>  <file name>', got {line[:200]!r}")
        digest, name = match.groups()
        if name in sums:
            raise PackageError(f"{where} line {number}: {name} is listed twice")
        if name not in FILES:
            raise PackageError(f"{where} line {number}: lists {name}; a package holds only {', '.join(FILES)}")
        sums[name] = digest
    missing = [name for name, rule in FILES.items() if rule.required and name not in sums]
    if missing:
        raise PackageError(f"{where}: no checksum for {', '.join(missing)}")
    return sums


def _from_files(files: dict[str, bytes], source: str, public_keys: list[Ed25519PublicKey] | None = None,
                load_weights: bool | None = True) -> Package:
    """Verify `files` (name -> bytes) and parse them into a Package. With `public_keys`, the signature is
    checked first: nothing of an unsigned package is parsed. `load_weights`: as `open_package`'s `weights`."""
    where = source.rstrip("/") or "."

    def at(name: str) -> str:
        return f"{where}/{name}"

    if CHECKSUM_FILE not in files:
        raise PackageError(f"{at(CHECKSUM_FILE)}: missing; a serving package must carry its checksums")
    signer = ""
    if public_keys:
        from maskrcnn.signature import SignatureError, verify

        try:
            signer = verify(files[CHECKSUM_FILE], files.get(SIGNATURE_FILE), public_keys, at(SIGNATURE_FILE))
        except SignatureError as exc:
            raise PackageError(str(exc)) from None
    sums = parse_checksums(files[CHECKSUM_FILE], at(CHECKSUM_FILE))
    for name in files:
        if name not in sums and name not in UNLISTED:
            raise PackageError(f"{at(name)}: not listed in {CHECKSUM_FILE}")
    for name, digest in sums.items():
        if name not in files:
            raise PackageError(f"{at(name)}: missing from the package")
        actual = hashlib.sha256(files[name]).hexdigest()
        if actual != digest:
            raise PackageError(f"{at(name)}: sha256 {actual} does not match {digest} in {CHECKSUM_FILE}")
    metadata = _json(files["metadata.json"], at("metadata.json"))
    if not isinstance(metadata, dict):
        raise PackageError(f"{at('metadata.json')}: expected a JSON object")
    fmt = metadata.get("format_version")
    if fmt not in SUPPORTED_FORMATS or isinstance(fmt, bool):
        hint = " (written before package formats were versioned: export it again with `uv run -m training.export`)" \
            if fmt is None else ""
        raise PackageError(f"{at('metadata.json')}: format_version {fmt!r} is not supported; this reader loads "
                           f"format(s) {', '.join(map(str, SUPPORTED_FORMATS))}{hint}")
    config = parse_config(files["config.yaml"], at("config.yaml"))
    label_map = parse_label_map(files["label_map.json"], at("label_map.json"))
    graph_tensors: dict[str, tuple[int, ...]] = {}
    if ONNX_FILE in files:
        try:
            graph_tensors = check_graph(files[ONNX_FILE], at(ONNX_FILE), HEAD_WEIGHTS)
        except GraphError as exc:
            raise PackageError(str(exc)) from None
    weights = None
    if load_weights or (load_weights is None and ONNX_FILE not in files):
        weights = _weights(files["model.pt"], at("model.pt"))
        _check_head(weights, "model.pt", label_map, at("label_map.json"))
    else:  # the graph keeps the weights' names (a graph without them answers to the probe and the label map)
        check_weights_pickle(files["model.pt"], at("model.pt"))
        if graph_tensors:
            _check_head(graph_tensors, ONNX_FILE, label_map, at("label_map.json"))
    probe = _probe(files["probe.npz"], at("probe.npz"))
    reference = None
    if REFERENCE_FILE in files:
        try:
            reference = parse_reference(files[REFERENCE_FILE], at(REFERENCE_FILE), label_map.names)
        except ReferenceError as exc:
            raise PackageError(str(exc)) from None
    if CARD_FILE in files:
        _card_text(files[CARD_FILE], at(CARD_FILE))
    return Package(dict(files), config, label_map, metadata, weights, probe, source, signer, reference)


def _check_head(tensors: Mapping[str, Any], holder: str, label_map: LabelMap, where: str) -> None:
    """The head's outputs (`HEAD_WEIGHTS`' first dimension in `tensors`: a state_dict, or the graph's
    initializer shapes) must be the label map's classes, background included."""
    for key in HEAD_WEIGHTS:
        shape = tuple(tensors[key].shape if hasattr(tensors[key], "shape") else tensors[key]) if key in tensors else ()
        rows = shape[0] if shape else None
        if rows != label_map.num_classes:
            raise PackageError(f"{where}: {len(label_map.category_ids)} categories need a head of "
                               f"{label_map.num_classes} outputs (background included), but {holder}'s {key} has "
                               f"{rows if rows is not None else 'no such tensor'}")


def _card_text(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PackageError(f"{where}: not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise PackageError(f"{where}: contains a NUL character; a model card is Markdown text")
    return text


def _json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PackageError(f"{where}: not valid JSON ({exc})") from None


def parse_label_map(data: bytes, where: str) -> LabelMap:
    """`label_map.json`: labels exactly 1..K with unique ids and names (`LabelMap.from_dict`)."""
    try:
        return LabelMap.from_dict(_json(data, where))
    except LabelError as exc:
        raise PackageError(f"{where}: {exc}") from None


def parse_config(data: bytes, where: str) -> Config:
    """`config.yaml`: YAML without aliases (checked on the event stream, before anything is built), then
    every field typed and within its documented range."""
    try:
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(data, Loader=yaml.SafeLoader))
        if aliases > MAX_YAML_ALIASES:
            raise PackageError(f"{where}: {aliases} YAML alias(es); at most {MAX_YAML_ALIASES} are allowed")
        tree = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise PackageError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict):
        raise PackageError(f"{where}: expected a mapping at the top level")
    try:
        return Config.from_dict(tree)
    except (ConfigError, TypeError) as exc:
        raise PackageError(f"{where}: {exc}") from None


def check_zip(data: bytes, where: str, max_total: int) -> None:
    """A zip archive (torch's `model.pt`, numpy's `.npz`) whose records are all stored uncompressed and
    whose total size is within `max_total`, checked from its central directory before anything inflates."""
    try:
        records = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise PackageError(f"{where}: not a zip archive ({exc})") from None
    for info in records:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise PackageError(f"{where}: record {info.filename[:100]} is compressed; records must be stored "
                               f"uncompressed (as torch.save and numpy.savez write them)")
    total = sum(info.file_size for info in records)
    if total > max_total:
        raise PackageError(f"{where}: holds {total} bytes uncompressed; at most {max_total} are allowed")


# What torch.save writes for a state_dict: the only callables its pickle may name.
WEIGHTS_GLOBALS = frozenset({"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter",
                             *(f"torch {kind}Storage" for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int",
                                                                   "Short", "Char", "Byte", "Bool"))})
WEIGHTS_OPCODES_REFUSED = frozenset({"STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID"})


def check_weights_pickle(data: bytes, where: str) -> None:
    """`model.pt` checked as a weights-only state_dict without torch and without unpickling anything: a
    zip of stored records whose `data.pkl` names no callable but torch.save's own for tensors and storages
    (`WEIGHTS_GLOBALS`, by protocol 2's GLOBAL opcode) and uses no other way to reach one. PackageError
    otherwise. (With torch, `torch.load(weights_only=True)` is the check.)"""
    import pickletools

    check_zip(data, where, FILES["model.pt"].max_bytes)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise PackageError(f"{where}: not a weights-only state_dict (expected one data.pkl record, found {len(pickles)})")
        payload = archive.read(pickles[0])
    try:
        for op, arg, _ in pickletools.genops(payload):
            if op.name in WEIGHTS_OPCODES_REFUSED or (op.name == "GLOBAL" and arg not in WEIGHTS_GLOBALS):
                named = f" {arg}" if op.name == "GLOBAL" else ""
                raise PackageError(f"{where}: not a weights-only state_dict (its pickle uses {op.name}{named}; only "
                                   f"torch.save's tensors and storages are allowed)")
    except ValueError as exc:  # a truncated or malformed pickle
        raise PackageError(f"{where}: not a weights-only state_dict (malformed pickle: {exc})") from None


def _weights(data: bytes, where: str) -> dict[str, torch.Tensor]:
    import pickle

    try:
        import torch
    except ImportError:  # the lean serving image: ONNX Runtime only
        raise PackageError(f"{where}: this image has no PyTorch, so it serves only packages with a graph "
                           f"({ONNX_FILE}); serve this one with {EAGER_IMAGE}, or export its graph with "
                           f"`uv run -m training.export`") from None

    check_zip(data, where, FILES["model.pt"].max_bytes)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
        raise PackageError(f"{where}: not a weights-only state_dict ({type(exc).__name__}: {str(exc)[:300]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise PackageError(f"{where}: expected a state_dict (tensor names -> tensors)")
    return state


def _probe(data: bytes, where: str) -> Probe:
    check_zip(data, where, FILES["probe.npz"].max_bytes)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        return Probe.from_arrays(arrays)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise PackageError(f"{where}: {exc}") from None


def metadata_bytes(meta: dict[str, Any]) -> bytes:
    """metadata.json's bytes for `meta`, with the format version (the writer's and `stamped`'s one form)."""
    return json.dumps({**meta, "format_version": FORMAT_VERSION}, indent=2, sort_keys=True, default=str).encode()


def with_checksums(files: dict[str, bytes]) -> dict[str, bytes]:
    """The package's listed files and a SHA256SUMS over them (unsigned)."""
    listed = {name: files[name] for name in FILES if name in files}
    lines = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in listed.items())
    return {**listed, CHECKSUM_FILE: lines.encode()}
