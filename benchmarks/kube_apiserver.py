"""The tests' real Kubernetes API server: what it costs to start and hold, and a promote-step round trip.

    uv run python benchmarks/kube_apiserver.py [--rounds 3] [--patches 50]

Per round: start etcd + kube-apiserver (certificates included) until /readyz, load KServe's CRDs until
Established, resident memory of both, then `--patches` storageUri merge patches followed by a GET as the
promote step's ServiceAccount (a TokenRequest token through RBAC) against the same calls as the admin (the
baseline: the ratio is RBAC's and the token's cost). The binary's build is timed only when it is not
cached yet (`devstack.kube_build`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack import kube_build, kubeapi  # noqa: E402

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


def patch_round_trips(kubeconfig: Path, namespace: str, count: int) -> float:
    """Median milliseconds of one storageUri merge patch plus one GET of the InferenceService."""
    from kubernetes import client, config

    api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(kubeconfig)))
    times = []
    for i in range(count):
        began = time.perf_counter()
        api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "maskrcnn",
                                           {"spec": {"predictor": {"model": {"storageUri": f"gs://b/v{i}"}}}})
        api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "maskrcnn")
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def one_round(patches: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kube-bench-") as tmp:
        began = time.monotonic()
        api = kubeapi.start(Path(tmp) / "kube")
        try:
            started = time.monotonic() - began
            idle = api.rss_mb()
            began = time.monotonic()
            api.apply_crds(sorted((ROOT / "deployment" / "crds").glob("kserve-*.yaml")))
            crds = time.monotonic() - began
            loaded = api.rss_mb()
            ns = "bench"
            isvc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService", "metadata": {"name": "maskrcnn", "namespace": ns},
                    "spec": {"predictor": {"model": {"modelFormat": {"name": "maskrcnn"}, "storageUri": "gs://b/v"}}}}
            role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "p", "namespace": ns},
                    "rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "patch"]}]}
            binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "p", "namespace": ns},
                       "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "p"},
                       "subjects": [{"kind": "ServiceAccount", "name": "promoter", "namespace": ns}]}
            api.apply(yaml.safe_dump_all([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
                                          {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "promoter", "namespace": ns}},
                                          role, binding, isvc]))
            token = api.token_kubeconfig(Path(tmp) / "promoter.kubeconfig", "promoter", ns)
            admin_ms = patch_round_trips(api.kubeconfig, ns, patches)
            token_ms = patch_round_trips(token, ns, patches)
            after = api.rss_mb()
        finally:
            api.stop()
    return {"start_s": started, "crds_s": crds, "apiserver_idle_mb": idle["kube-apiserver"],
            "apiserver_crds_mb": loaded["kube-apiserver"], "apiserver_after_mb": after["kube-apiserver"],
            "etcd_mb": after["etcd"], "admin_ms": admin_ms, "token_ms": token_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patches", type=int, default=50)
    args = parser.parse_args()
    cached = kube_build.cached_binary().is_file()
    began = time.monotonic()
    binary = kube_build.kube_apiserver()
    build = "cached" if cached else f"{time.monotonic() - began:.0f} s"
    print(f"kube-apiserver {kube_build.KUBE_VERSION}: {binary} ({binary.stat().st_size / 1e6:.0f} MB), build: {build}")
    rows = [one_round(args.patches) for _ in range(args.rounds)]
    print("| round | start to /readyz (s) | KServe CRDs Established (s) | apiserver RSS idle / with CRDs / after (MB) "
          "| etcd RSS (MB) | patch+GET as admin (ms, median) | as the ServiceAccount (ms) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        print(f"| {i} | {r['start_s']:.1f} | {r['crds_s']:.1f} | {r['apiserver_idle_mb']:.0f} / {r['apiserver_crds_mb']:.0f} / "
              f"{r['apiserver_after_mb']:.0f} | {r['etcd_mb']:.0f} | {r['admin_ms']:.1f} | {r['token_ms']:.1f} | "
              f"{r['token_ms'] / r['admin_ms']:.2f} |")


if __name__ == "__main__":
    main()
