"""The Prometheus rules (deployment/monitoring/rules.yaml) with the real `promtool` (Debian's prometheus):
they load and lint clean, every alert has a case that fires and one that stays quiet in rules_test.yaml and
those cases pass, the cases fail when a rule is broken, and every metric the rules read is one the
predictor exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deployment" / "monitoring"


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing (Debian: apt-get install prometheus; the test command installs it)"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def alerts() -> dict[str, dict]:
    groups = yaml.safe_load((MONITORING / "rules.yaml").read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_the_rules_load_and_lint_clean():
    done = promtool("check", "rules", "rules.yaml")
    assert done.returncode == 0 and "SUCCESS: 21 rules found" in done.stdout, done.stdout + done.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_stays_quiet_and_they_pass():
    cases = yaml.safe_load((MONITORING / "rules_test.yaml").read_text())["tests"]
    seen: dict[str, set[bool]] = {}
    for case in cases:
        for check in case["alert_rule_test"]:
            seen.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    assert {name: {True, False} for name in alerts()} == seen
    done = promtool("test", "rules", "rules_test.yaml")
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("alert, change", [
    ("MaskrcnnInputDrift", (r'(statistic=~"brightness\|contrast\|megapixels"\}) > 0.25', r"\1 > 0.9")),
    ("MaskrcnnHighErrorRatio", (r"maskrcnn:errors:ratio5m > 0.05", "maskrcnn:errors:ratio5m > 0.5")),
    ("MaskrcnnClassMixShift", (r"maskrcnn:class_mix:tvd30m > 0.2", "maskrcnn:class_mix:tvd30m > 0.5")),
    ("MaskrcnnNotReady", (r"\(maskrcnn_ready\) == 0", "(maskrcnn_ready) < 2")),
])
def test_the_cases_fail_when_a_rule_is_broken(tmp_path, alert, change):
    """A threshold moved too high (the firing case goes quiet) or too low (the quiet case fires)."""
    text = (MONITORING / "rules.yaml").read_text()
    broken, count = re.subn(change[0], change[1], text, count=1)
    assert count == 1
    (tmp_path / "rules.yaml").write_text(broken)
    shutil.copy(MONITORING / "rules_test.yaml", tmp_path)
    done = promtool("test", "rules", "rules_test.yaml", cwd=tmp_path)
    assert done.returncode != 0 and f"alertname: {alert}" in done.stdout + done.stderr, done.stdout + done.stderr


def test_the_rules_read_only_metrics_the_predictor_exports(serving_client):
    """Every `maskrcnn_*` metric named in the rules is on the predictor's /metrics (a renamed metric would
    leave a rule silently empty)."""
    groups = yaml.safe_load((MONITORING / "rules.yaml").read_text())["groups"]
    named = {m for g in groups for r in g["rules"] for m in re.findall(r"\b(maskrcnn_[a-z_]+)", r["expr"])}
    exported = serving_client.get("/metrics").text
    families = set(re.findall(r"^# TYPE (maskrcnn_[a-z_]+) ", exported, re.M))
    suffixes = ("_bucket", "_count", "_sum", "_total")
    missing = {n for n in named if n not in families and not any(n.endswith(s) and n[: -len(s)] in families for s in suffixes)}
    assert not missing, f"rules read metrics the predictor does not export: {sorted(missing)}"


def dropped_keys(given, kept, path: str = "") -> list[str]:
    """Paths of keys in `given` that are not in `kept` (the SDK's re-serialised form adds defaults)."""
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [path or "."]
        return [p for k, v in given.items() for p in ([f"{path}.{k}"] if k not in kept else dropped_keys(v, kept[k], f"{path}.{k}"))]
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [p for i, (a, b) in enumerate(zip(given, kept)) for p in dropped_keys(a, b, f"{path}[{i}]")]
    return []


def reserialised(dashboard: dict) -> dict:
    import json

    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    return json.loads(json.dumps(Dashboard.from_json(dashboard), cls=JSONEncoder))


def test_the_dashboard_has_no_key_grafanas_schema_does_not_know():
    """grafana-foundation-sdk reads the dashboard and drops what its schema does not know: nothing may be
    dropped (a misspelt key is a panel option silently ignored); the check catches a misspelling."""
    import copy
    import json

    dashboard = json.loads((MONITORING / "grafana" / "dashboard.json").read_text())
    assert dropped_keys(dashboard, reserialised(dashboard)) == []
    assert len(dashboard["panels"]) >= 12 and all(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    typo = copy.deepcopy(dashboard)
    typo["panels"][0]["gridPoss"] = typo["panels"][0].pop("gridPos")
    assert dropped_keys(typo, reserialised(typo)) == [".panels[0].gridPoss"]


def test_every_dashboard_query_parses_and_reads_only_exported_or_recorded_series(serving_client, tmp_path):
    import json

    dashboard = json.loads((MONITORING / "grafana" / "dashboard.json").read_text())
    groups = yaml.safe_load((MONITORING / "rules.yaml").read_text())["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    exported = set(re.findall(r"^# TYPE (maskrcnn_[a-z_]+) ", serving_client.get("/metrics").text, re.M))
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(queries) >= 12
    for title, expr in queries:
        names = re.findall(r"\b(maskrcnn[:_][a-z0-9_:]+)", expr)
        assert names, (title, expr)  # each query reads a series of ours
        for name in names:
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)
            assert name in recorded or name in exported or base in exported, (title, name)
    # parsed by Prometheus's own PromQL parser: each query as a recording rule that promtool checks
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": expr}
                                                        for i, (_, expr) in enumerate(queries)]}]}
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert done.returncode == 0 and f"SUCCESS: {len(queries)} rules found" in done.stdout, done.stdout + done.stderr
    broken = {"groups": [{"name": "dashboard", "rules": [{"record": "dashboard:broken", "expr": queries[0][1] + " by ("}]}]}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))  # and the check can fail
    assert promtool("check", "rules", "broken.yaml", cwd=tmp_path).returncode != 0

