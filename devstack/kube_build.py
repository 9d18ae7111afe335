"""A real `kube-apiserver` for the tests, built offline from Debian bookworm's source package `kubernetes`.

No package ships a kube-apiserver binary (and envtest's downloader cannot reach its bucket from here), but
Debian's source package carries the whole upstream tree with its `vendor/` directory, so the API server
builds with Debian's Go and no network beyond the Debian mirror. The build takes about 6.5 minutes on 2
cores; its binary is cached outside the checkout, keyed by the source version and by this module's
adaptation of the tree (`RECIPE`), so a machine pays it once:

    $XDG_CACHE_HOME/maskrcnn-devstack/kube-apiserver-<version>-<recipe hash>/kube-apiserver
    (or under $MASKRCNN_DEVSTACK_CACHE)

`MASKRCNN_KUBE_APISERVER=/path/to/kube-apiserver` uses a binary you provide instead (its `--version` must
name `KUBE_VERSION`'s minor release). The adaptation, each step measured on these machines:

1. the source is fetched with a private `APT_CONFIG` holding one `deb-src` entry made from the machine's
   own Debian mirror and keyring (the system's apt configuration is not touched);
2. Debian's patches (`debian/patches/series`) are applied;
3. the vendored `github.com/modern-go/reflect2` 1.0.1 is replaced by Debian's packaged copy: 1.0.1
   segfaults under Go >= 1.18 on the first write of a custom resource (`runtime.mapiternext`);
4. `make WHAT=cmd/kube-apiserver` (GOPATH mode, runs the code generators; `go build` alone does not),
   with `GOPROXY=off`; `rsync` must be installed, or make writes empty generators.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from devstack.procs import StackError, run

log = logging.getLogger(__name__)

KUBE_VERSION = "1.20.2"  # bookworm's `kubernetes` source package
SOURCE_PACKAGE = "kubernetes"
REFLECT2 = Path("/usr/share/gocode/src/github.com/modern-go/reflect2")  # golang-github-modern-go-reflect2-dev
BUILD_PACKAGES = ("golang-go", "rsync", "golang-github-modern-go-reflect2-dev")
RECIPE = "debian-patches|reflect2=debian|make WHAT=cmd/kube-apiserver GOPROXY=off|v1"
BUILD_TIMEOUT_S = 40 * 60


def cache_root() -> Path:
    """`$MASKRCNN_DEVSTACK_CACHE`, else `$XDG_CACHE_HOME/maskrcnn-devstack` (~/.cache by default)."""
    given = os.environ.get("MASKRCNN_DEVSTACK_CACHE")
    return Path(given) if given else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "maskrcnn-devstack"


def cached_binary() -> Path:
    """Where the built binary lives for this version and recipe (it may not exist yet)."""
    key = hashlib.sha256(f"{SOURCE_PACKAGE}={KUBE_VERSION}|{RECIPE}".encode()).hexdigest()[:12]
    return cache_root() / f"kube-apiserver-{KUBE_VERSION}-{key}" / "kube-apiserver"


def kube_apiserver() -> Path:
    """The kube-apiserver binary: `MASKRCNN_KUBE_APISERVER`, else the cached build, else built now (minutes;
    one build at a time per machine, under a lock, so parallel test runs share it)."""
    given = os.environ.get("MASKRCNN_KUBE_APISERVER")
    if given:
        path = Path(given)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise StackError(f"MASKRCNN_KUBE_APISERVER={given}: not an executable file")
        return path
    target = cached_binary()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            build(target)
    return target


def _debian_mirror() -> tuple[str, str]:
    """(URI, keyring) of the machine's bookworm `deb` source, from /etc/apt (deb822 or one-line format)."""
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.+)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and "bookworm" in fields.get("Suites", "").split():
                return fields["URIs"].split()[0], fields.get("Signed-By", "/usr/share/keyrings/debian-archive-keyring.gpg")
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]:
        if path.is_file():
            match = re.search(r"^deb\s+(?:\[[^]]*signed-by=(\S+?)[\] ][^]]*\]\s+)?(\S+)\s+bookworm\s", path.read_text(), re.M)
            if match:
                return match.group(2), match.group(1) or "/usr/share/keyrings/debian-archive-keyring.gpg"
    raise StackError("building kube-apiserver needs Debian bookworm's source package `kubernetes`, but no bookworm "
                     "`deb` entry was found in /etc/apt to take the mirror from")


def fetch_source(workdir: Path) -> Path:
    """Download and unpack the source package into `workdir`, Debian's patches applied; the tree's path."""
    uri, keyring = _debian_mirror()
    apt = workdir / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list.d" / "src.sources").write_text(
        f"Types: deb-src\nURIs: {uri}\nSuites: bookworm\nComponents: main\nSigned-By: {keyring}\n")
    (apt / "apt.conf").write_text(
        f'Dir::State::Lists "{apt}/lists";\nDir::Cache "{apt}/cache";\nDir::Etc::SourceList "/dev/null";\n'
        f'Dir::Etc::SourceParts "{apt}/sources.list.d";\nDir::Etc::Preferences "/dev/null";\n'
        f'Dir::Etc::PreferencesParts "{apt}/preferences.d";\n')
    env = {**os.environ, "APT_CONFIG": str(apt / "apt.conf")}
    run(["apt-get", "update", "-q", "-o", "APT::Sandbox::User=root"], "apt-get update (deb-src only)", env=env, timeout=300)
    download = workdir / "download"
    download.mkdir()
    done = subprocess.run(["apt-get", "source", "--download-only", "-q", "-o", "APT::Sandbox::User=root", SOURCE_PACKAGE],
                          cwd=download, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise StackError(f"apt-get source {SOURCE_PACKAGE} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    # bookworm's version reads 1.20.5+really1.20.2-1.1+deb12u1: the upstream tree is KUBE_VERSION's
    orig = sorted(download.glob(f"{SOURCE_PACKAGE}_*.orig*.tar.*"))
    debian = sorted(download.glob(f"{SOURCE_PACKAGE}_*.debian.tar.*"))
    if not orig or not debian or not re.search(rf"(^|really){re.escape(KUBE_VERSION)}$", orig[0].name.split("_")[1].split(".orig")[0]):
        raise StackError(f"bookworm's source package is not kubernetes {KUBE_VERSION}: found {sorted(p.name for p in download.iterdir())}")
    tree = workdir / "src"
    tree.mkdir()
    for archive in orig:
        _untar(archive, tree, strip=True)
    _untar(debian[0], tree, strip=False)
    series = tree / "debian" / "patches" / "series"
    for name in series.read_text().split() if series.is_file() else []:
        if name.startswith("#"):
            continue
        run(["patch", "-p1", "-s", "-d", str(tree), "-i", str(tree / "debian" / "patches" / name)], f"Debian patch {name}")
    return tree


def _untar(archive: Path, into: Path, strip: bool) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        if strip:
            for member in members:
                parts = member.name.split("/", 1)
                member.name = parts[1] if len(parts) > 1 else ""
            members = [m for m in members if m.name]
        tar.extractall(into, members=members, filter="data")


def replace_reflect2(tree: Path) -> None:
    """Swap the vendored reflect2 for Debian's (Go sources and assembly only)."""
    if not REFLECT2.is_dir():
        raise StackError(f"{REFLECT2} is missing: install golang-github-modern-go-reflect2-dev")
    vendored = tree / "vendor" / "github.com" / "modern-go" / "reflect2"
    shutil.rmtree(vendored)
    vendored.mkdir(parents=True)
    for source in REFLECT2.iterdir():
        if source.suffix in (".go", ".s") and not source.name.endswith("_test.go"):
            shutil.copy2(source, vendored / source.name)


def build(target: Path) -> None:
    """Fetch, adapt and build; the binary is moved to `target` only when the build succeeded."""
    missing = [tool for tool in ("go", "rsync", "make", "patch") if shutil.which(tool) is None]
    if missing:
        raise StackError(f"building kube-apiserver needs {', '.join(missing)} on PATH (Debian: {' '.join(BUILD_PACKAGES)})")
    began = time.monotonic()
    log.warning("building kube-apiserver %s from Debian's source package (about 7 minutes, once per machine; "
                "cached at %s)", KUBE_VERSION, target)
    with tempfile.TemporaryDirectory(prefix="kube-build-", dir=os.environ.get("MASKRCNN_BUILD_DIR")) as tmp:
        work = Path(tmp)
        tree = fetch_source(work)
        replace_reflect2(tree)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
        env.update(GOPROXY="off", GOFLAGS="", KUBE_GIT_VERSION=f"v{KUBE_VERSION}", GOCACHE=str(work / "gocache"))
        log_file = work / "make.log"
        with open(log_file, "wb") as out:
            done = subprocess.run(["make", "WHAT=cmd/kube-apiserver"], cwd=tree, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
        built = tree / "_output" / "bin" / "kube-apiserver"
        if done.returncode != 0 or not built.is_file():
            tail = log_file.read_text(errors="replace").splitlines()[-30:]
            raise StackError(f"building kube-apiserver failed (exit {done.returncode}):\n" + "\n".join(tail))
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.rename(target)
    log.warning("built kube-apiserver in %.0f s", time.monotonic() - began)
