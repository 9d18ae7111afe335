"""Local Ray as the main job starts it: token authentication stays on unless the user opts out.

Ray 2.60 has no setting that binds GCS and the raylet to 127.0.0.1 (they listen on every interface
whatever `_node_ip_address` says), so the token is what keeps other hosts out. The test suite itself
opts out (`.ci/run` sets RAY_AUTH_MODE=disabled); these runs are fresh processes with their own Ray.
"""

from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.slow

PROBE = """
import os, urllib.error, urllib.request
import ray
from maskrcnn.config import load_config
from training.trainer import init_ray
init_ray(load_config("tiny", []))
url = "http://" + ray._private.worker.get_dashboard_url() + "/nodes?view=summary"
try:
    status = urllib.request.urlopen(url, timeout=10).status
except urllib.error.HTTPError as exc:
    status = exc.code
executable = ray.get_runtime_context().runtime_env.get("py_executable") or "-"
print("RESULT", os.environ.get("RAY_AUTH_MODE"), status, executable.replace(" ", "_"), flush=True)
ray.shutdown()
"""


def _probe(tmp_path, **env_changes) -> tuple[str, int, str]:
    """Start Ray with `init_ray` as `uv run -m training.ray_main` does: under `uv run` (Ray looks for it among the
    driver's ancestors). Returns RAY_AUTH_MODE, the dashboard's answer without a token, and the workers' executable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ENABLE_UV_RUN_RUNTIME_ENV")}
    env.update(env_changes, HOME=str(tmp_path))  # a private ~/.ray for the generated token
    out = subprocess.run(["uv", "run", "--no-sync", "python", "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=240, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    _, mode, status, executable = line.split()
    return mode, int(status), executable


def test_local_ray_keeps_token_auth_on(tmp_path):
    mode, status, executable = _probe(tmp_path)
    assert mode == "token" and status in (401, 403)  # the dashboard refuses a client without the token
    assert (tmp_path / ".ray" / "auth_token").is_file()
    # Ray's `uv run` hook is off for a local Ray: its workers run this interpreter, not a rebuilt copy of the venv.
    assert executable == "-"


def test_the_user_can_opt_out(tmp_path):
    mode, status, _ = _probe(tmp_path, RAY_AUTH_MODE="disabled")
    assert mode == "disabled" and status == 200


def test_the_uv_hook_can_be_kept(tmp_path):
    """The probe does see the hook when the user asks for it, so the assertion above can fail."""
    _, _, executable = _probe(tmp_path, RAY_AUTH_MODE="disabled", RAY_ENABLE_UV_RUN_RUNTIME_ENV="1")
    # `uv run ...` as the driver's ancestor ran it: `uv`, or its full path when a shim (pyenv) started it
    assert os.path.basename(executable).startswith("uv_run_"), executable
