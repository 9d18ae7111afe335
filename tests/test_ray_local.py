"""Local Ray as the main job starts it: token authentication stays on unless the user opts out.

Ray 2.60 has no setting that binds GCS and the raylet to 127.0.0.1 (they listen on every interface
whatever `_node_ip_address` says), so the token is what keeps other hosts out. The test suite itself
opts out (`.ci/run` sets RAY_AUTH_MODE=disabled); these runs are fresh processes with their own Ray.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PROBE = """
import os, urllib.error, urllib.request
import ray
from training.config import load_config
from training.trainer import init_ray
init_ray(load_config("tiny", []))
url = "http://" + ray._private.worker.get_dashboard_url() + "/nodes?view=summary"
try:
    status = urllib.request.urlopen(url, timeout=10).status
except urllib.error.HTTPError as exc:
    status = exc.code
print("RESULT", os.environ.get("RAY_AUTH_MODE"), status, flush=True)
ray.shutdown()
"""


def _probe(tmp_path, **env_changes) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(env_changes, HOME=str(tmp_path))  # a private ~/.ray for the generated token
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=240)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    _, mode, status = line.split()
    return mode, int(status)


def test_local_ray_keeps_token_auth_on(tmp_path):
    mode, status = _probe(tmp_path)
    assert mode == "token" and status in (401, 403)  # the dashboard refuses a client without the token
    assert (tmp_path / ".ray" / "auth_token").is_file()


def test_the_user_can_opt_out(tmp_path):
    mode, status = _probe(tmp_path, RAY_AUTH_MODE="disabled")
    assert mode == "disabled" and status == 200
