"""A real Kubernetes API server for the tests: etcd and kube-apiserver on 127.0.0.1, RBAC on.

As controller-runtime's envtest does upstream: the API server and its etcd, no controller-manager, no
scheduler, no kubelet. So objects are stored, validated, versioned (`metadata.generation`,
`resourceVersion`), watched and authorised exactly as on a cluster, but nothing acts on them: no pods run,
namespaces never finish deleting, and ServiceAccounts get no token Secrets (tokens come from the
TokenRequest API, as on any cluster since 1.22). A test that needs KServe's controller plays it
(`tests/k8s_controller.py`).

    api = start(Path("/tmp/kube"))          # about 5 s once the binary is built (see kube_build)
    api.apply_crds(KSERVE_CRDS)
    api.kubectl("apply", "-f", "manifests.yaml")
    kubeconfig = api.token_kubeconfig(path, "pipeline-runner", "kubeflow")   # a real ServiceAccount token
    api.stop()

Certificates are made with openssl for this server only: a CA, the server's (127.0.0.1), an admin client
(`O=system:masters`, which RBAC lets do everything) and the ServiceAccount signing key. Every file is in
`root`, readable by its owner only; the kubeconfigs embed the CA so that a container can use them.
"""

from __future__ import annotations

import base64
import logging
import re
import shutil
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from devstack import kube_build
from devstack.procs import (StackError, free_port, http_ok, port_open, run, running_pid, spawn, stop_pid, wait_for,
                            write_private)

log = logging.getLogger(__name__)

ISSUER = "https://kubernetes.default.svc"
START_TIMEOUT_S = 60
# KServe's CRDs as vendored declare `default: ""` on string fields; the 1.20 API server reads that
# default as null and refuses the whole CRD (`spec.validation...default: Required value`). The adaptation
# drops those lines in a copy (never in deployment/crds): 1.20 then serves both CRDs. Nothing the
# platform writes relies on those defaults (they are empty strings).
EMPTY_STRING_DEFAULT = re.compile(r"^\s*default: \"\"\s*$\n", re.M)


def adapt_crd_for_1_20(text: str) -> str:
    """The CRD manifest with its `default: ""` lines removed (see EMPTY_STRING_DEFAULT)."""
    return EMPTY_STRING_DEFAULT.sub("", text)


def _openssl(*args: str) -> None:
    run(["openssl", *args], f"openssl {args[0]}")


def make_certificates(pki: Path) -> None:
    """CA, server, admin client and ServiceAccount keys in `pki` (2048-bit RSA, valid for a day)."""
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"),
             "-days", "1", "-subj", "/CN=maskrcnn-test-ca")
    ext = pki / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
                   "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n")
    for name, subject, extfile in (("server", "/CN=kube-apiserver", ext), ("admin", "/O=system:masters/CN=admin", None)):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki / f"{name}.key"), "-out", str(pki / f"{name}.csr"),
                 "-subj", subject)
        _openssl("x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
                 "-CAcreateserial", "-out", str(pki / f"{name}.crt"), "-days", "1",
                 *(["-extfile", str(extfile)] if extfile else []))
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    for key in pki.glob("*.key"):
        key.chmod(0o600)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@dataclass
class KubeApi:
    """A running etcd + kube-apiserver pair (see `start`)."""

    root: Path
    port: int
    etcd_port: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (client certificate in `system:masters`)."""
        return self.root / "admin.kubeconfig"

    def _kubeconfig(self, path: Path, user: dict, namespace: str = "default") -> Path:
        return write_private(path, yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url, "certificate-authority-data": _b64(self.pki / "ca.crt")}}],
            "users": [{"name": "test", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}]}))

    def write_admin_kubeconfig(self) -> Path:
        return self._kubeconfig(self.kubeconfig, {"client-certificate-data": _b64(self.pki / "admin.crt"),
                                                  "client-key-data": _b64(self.pki / "admin.key")})

    def kubectl(self, *args: str, kubeconfig: Path | None = None, input_text: str | None = None, timeout: float = 60) -> str:
        """Run kubectl against this server (as the admin unless `kubeconfig`); StackError with its output if it fails."""
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise StackError("kubectl is not on PATH")
        return run([kubectl, "--kubeconfig", str(kubeconfig or self.kubeconfig), *args], f"kubectl {args[0]}",
                   timeout=timeout, input_text=input_text)

    def apply(self, manifest: str, kubeconfig: Path | None = None) -> str:
        """`kubectl apply` of a YAML text, with kubectl's schema validation (unknown or mistyped fields fail)."""
        return self.kubectl("apply", "--validate=true", "-f", "-", kubeconfig=kubeconfig, input_text=manifest)

    def apply_crds(self, paths: list[Path], timeout: float = 60) -> list[str]:
        """Apply CRD manifests (adapted for 1.20, see `adapt_crd_for_1_20`) and wait until each is Established;
        their names."""
        names = []
        for path in paths:
            text = adapt_crd_for_1_20(path.read_text())
            # created, not applied: client-side apply's last-applied annotation of KServe's CRD (its
            # schema is large) would pass the 256 KiB limit on annotations
            self.kubectl("create", "--validate=true", "-f", "-", input_text=text)
            names += [doc["metadata"]["name"] for doc in yaml.safe_load_all(text) if doc]
        self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", *[f"crd/{n}" for n in names],
                     timeout=timeout + 10)
        return names

    def token(self, service_account: str, namespace: str, seconds: int = 3600) -> str:
        """A token for `namespace/service_account` from the TokenRequest API (the ServiceAccount must exist)."""
        from kubernetes import client, config

        api = client.CoreV1Api(config.new_client_from_config(config_file=str(self.kubeconfig)))
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[ISSUER], expiration_seconds=seconds))
        return api.create_namespaced_service_account_token(service_account, namespace, request).status.token

    def token_kubeconfig(self, path: Path, service_account: str, namespace: str) -> Path:
        """A kubeconfig that acts as `namespace/service_account`, whose default namespace is `namespace`."""
        return self._kubeconfig(path, {"token": self.token(service_account, namespace)}, namespace)

    def ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        return http_ok(f"{self.url}/readyz", context=context)

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of the API server and etcd, in MB."""
        out = {}
        for name in ("kube-apiserver", "etcd"):
            pid = running_pid(self.root / f"{name}.pid", name)
            if pid is not None:
                status = Path(f"/proc/{pid}/status").read_text()
                out[name] = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
        return out

    def stop(self) -> None:
        """Stop the API server, then etcd, by the PIDs they were started with."""
        for name in ("kube-apiserver", "etcd"):
            pid = running_pid(self.root / f"{name}.pid", name)
            if pid is not None:
                stop_pid(pid, name, timeout=15)


def start(root: Path, binary: Path | None = None) -> KubeApi:
    """Start etcd and kube-apiserver on free loopback ports, state and certificates under `root`."""
    etcd = shutil.which("etcd")
    if etcd is None:
        raise StackError("etcd is not on PATH (Debian: apt-get install etcd-server)")
    binary = binary or kube_build.kube_apiserver()
    root.mkdir(parents=True, exist_ok=True)
    api = KubeApi(root, free_port(), free_port())
    make_certificates(api.pki)
    peer = free_port()
    etcd_log = root / "etcd.log"
    proc = spawn([etcd, "--name", "test", "--data-dir", str(root / "etcd"), "--unsafe-no-fsync",
                  "--listen-client-urls", f"http://127.0.0.1:{api.etcd_port}",
                  "--advertise-client-urls", f"http://127.0.0.1:{api.etcd_port}",
                  "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                  "--initial-cluster", f"test=http://127.0.0.1:{peer}", "--listen-metrics-urls", ""],
                 etcd_log, pid_file=root / "etcd.pid")
    try:
        wait_for(lambda: port_open(api.etcd_port), "etcd", 30, etcd_log, proc.pid)
        pki, server_log = api.pki, root / "kube-apiserver.log"
        began = time.monotonic()
        server = spawn([str(binary), "--bind-address=127.0.0.1", f"--secure-port={api.port}", "--insecure-port=0",
                        f"--etcd-servers=http://127.0.0.1:{api.etcd_port}", f"--cert-dir={root / 'certs'}",
                        f"--client-ca-file={pki / 'ca.crt'}", f"--tls-cert-file={pki / 'server.crt'}",
                        f"--tls-private-key-file={pki / 'server.key'}", f"--service-account-key-file={pki / 'sa.pub'}",
                        f"--service-account-signing-key-file={pki / 'sa.key'}", f"--service-account-issuer={ISSUER}",
                        f"--api-audiences={ISSUER}", "--authorization-mode=RBAC", "--enable-priority-and-fairness=false",
                        "--service-cluster-ip-range=10.96.0.0/24", "--profiling=false", "--advertise-address=127.0.0.1"],
                       server_log, pid_file=root / "kube-apiserver.pid")
        api.write_admin_kubeconfig()
        wait_for(api.ready, "kube-apiserver", START_TIMEOUT_S, server_log, server.pid, interval=0.2)
        log.info("kube-apiserver ready on %s in %.1f s", api.url, time.monotonic() - began)
    except BaseException:
        api.stop()
        raise
    return api

