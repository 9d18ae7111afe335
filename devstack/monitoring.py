"""A local Prometheus and Alertmanager (Debian's `prometheus` and `prometheus-alertmanager`) on 127.0.0.1.

Prometheus scrapes the given predictors' `/metrics`, evaluates the given rule files and sends alerts to
Alertmanager, which posts them to a webhook. Both run as plain processes (no systemd), stopped by PID;
Alertmanager's gossip port is off (`--cluster.listen-address=`), so nothing listens beyond loopback.

    mon = start(Path("/tmp/mon"), targets=["127.0.0.1:8080"], rule_files=[RULES], webhook="http://127.0.0.1:9999/")
    mon.query('maskrcnn:requests:rate5m')     # the HTTP API's instant query: [(labels, value)]
    mon.stop()

`time_scaled_rules` makes a copy of the rules with their windows and `for` durations shortened, so that a
test sees an alert in seconds rather than tens of minutes; the expressions are otherwise the same.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from devstack.procs import StackError, free_port, http_ok, running_pid, spawn, stop_pid, wait_for

RULES = Path(__file__).resolve().parents[1] / "deployment" / "monitoring" / "rules.yaml"


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise StackError(f"{names[0]} is not on PATH (Debian: apt-get install prometheus prometheus-alertmanager)")


def time_scaled_rules(source: Path, target: Path, scale: dict[str, str], min_count: int, interval: str = "1s") -> Path:
    """`source`'s rules with each duration in `scale` (e.g. {"30m": "20s"}) replaced in range selectors and
    `for:` fields, the groups evaluated every `interval`, and the drift alerts' minimum of 100 images or
    detections replaced by `min_count`."""
    text = re.sub(r"(\binterval: )\S+", rf"\g<1>{interval}", source.read_text())
    for long, short in scale.items():
        text = re.sub(rf"\[{long}\]", f"[{short}]", text)
        text = re.sub(rf"(\bfor: ){long}\b", rf"\g<1>{short}", text)
    text = text.replace(">= 100", f">= {min_count}")
    target.write_text(text)
    return target


@dataclass
class Monitoring:
    root: Path
    prometheus_port: int
    alertmanager_port: int

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    def _get(self, url: str) -> dict:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.load(answer)

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query through Prometheus' HTTP API: (labels, value) per series."""
        doc = self._get(f"{self.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        if doc.get("status") != "success":
            raise StackError(f"query {expr!r} failed: {doc}")
        return [(r["metric"], float(r["value"][1])) for r in doc["data"]["result"]]

    def set_targets(self, targets: list[str], labels: dict[str, str] | None = None) -> None:
        """Scrape `targets` (host:port) from now on: the configuration rewritten and reloaded (`/-/reload`).
        `labels`: target labels put on every series scraped from them, as a cluster's PodMonitoring or
        PodMonitor puts `namespace` (and `pod`, `container`)."""
        config = yaml.safe_load((self.root / "prometheus.yml").read_text())
        config["scrape_configs"][0]["static_configs"] = [{"targets": targets, **({"labels": labels} if labels else {})}]
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(config))
        request = urllib.request.Request(f"{self.prometheus_url}/-/reload", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            if answer.status != 200:
                raise StackError(f"Prometheus did not reload its configuration: HTTP {answer.status}")

    def targets_up(self) -> bool:
        active = self._get(f"{self.prometheus_url}/api/v1/targets")["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def alerts(self) -> list[dict]:
        """The alerts Alertmanager holds now (API v2)."""
        return self._get(f"{self.alertmanager_url}/api/v2/alerts")

    def stop(self) -> None:
        for name, program in (("prometheus", "prometheus"), ("alertmanager", "prometheus-alertmanager")):
            pid = running_pid(self.root / f"{name}.pid", program)
            if pid is not None:
                stop_pid(pid, name, timeout=10)


def start(root: Path, targets: list[str], rule_files: list[Path], webhook: str | None = None,
          scrape_interval: str = "1s", evaluation_interval: str = "1s") -> Monitoring:
    """Start Alertmanager (posting to `webhook`, when given) and Prometheus (scraping `targets`, host:port,
    with `rule_files`) on free loopback ports, state under `root`; both ready when this returns."""
    root.mkdir(parents=True, exist_ok=True)
    mon = Monitoring(root, free_port(), free_port())
    receiver = {"name": "webhook", **({"webhook_configs": [{"url": webhook, "send_resolved": True}]} if webhook else {})}
    (root / "alertmanager.yml").write_text(yaml.safe_dump({
        "route": {"receiver": "webhook", "group_by": ["alertname", "model_version"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [receiver]}))
    (root / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": [str(p) for p in rule_files],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{mon.alertmanager_port}"]}]}]},
        "scrape_configs": [{"job_name": "maskrcnn-predictor", "static_configs": [{"targets": targets}]}]}))
    am_log, prom_log = root / "alertmanager.log", root / "prometheus.log"
    try:
        am = spawn([_binary("prometheus-alertmanager", "alertmanager"), f"--config.file={root / 'alertmanager.yml'}",
                    f"--storage.path={root / 'alertmanager'}", f"--web.listen-address=127.0.0.1:{mon.alertmanager_port}",
                    "--cluster.listen-address="], am_log, pid_file=root / "alertmanager.pid")
        wait_for(lambda: http_ok(f"{mon.alertmanager_url}/-/ready"), "alertmanager", 30, am_log, am.pid)
        prom = spawn([_binary("prometheus"), f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
                      f"--web.listen-address=127.0.0.1:{mon.prometheus_port}", "--web.enable-lifecycle"],
                     prom_log, pid_file=root / "prometheus.pid")
        wait_for(lambda: http_ok(f"{mon.prometheus_url}/-/ready"), "prometheus", 30, prom_log, prom.pid)
    except BaseException:
        mon.stop()
        raise
    return mon

