"""A test launcher: `python -m serving` with a hook in the forward pass (a test hook, not a stand-in).

An image 13 pixels wide blocks its forward pass for ever (a network that never returns); one 17 pixels
wide takes `HOOK_SLOW_S` seconds (a heavy request, predictable on any machine). Every other image runs
the package's network as usual, unless $HOOK_FAULT says otherwise for every image: `error` (the forward
pass raises, as a broken model or runtime would: the request is answered 500), `slow:SECONDS` (each
forward pass takes that much longer), `refuse` (9 requests in 10 are answered 400, as a model whose
input contract changed would refuse valid images) or `crash:N` (the process dies in its N-th forward pass,
as an OOM kill would, and this launcher restarts it, as the kubelet does: a crash-looping predictor).

    python tests/hooked_serving.py --model-dir PACKAGE [serving's flags]
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serving.predictor as predictor  # noqa: E402
from serving.__main__ import main  # noqa: E402

STUCK_WIDTH, SLOW_WIDTH, HOOK_SLOW_S = 13, 17, 0.5
_detect = predictor.detect


FAULT = os.environ.get("HOOK_FAULT", "")
_calls = itertools.count(1)


def hooked_detect(network, image, *args, **kwargs):
    n = next(_calls)
    if FAULT == "error":
        raise RuntimeError("HOOK_FAULT=error: the forward pass failed")
    if FAULT.startswith("die:") and n >= int(FAULT.split(":", 1)[1]):
        os._exit(137)  # killed in the middle of a request: nothing more is counted or answered
    if FAULT.startswith("slow:"):
        time.sleep(float(FAULT.split(":", 1)[1]))
    width = image.shape[1]  # HxWx3
    if width == STUCK_WIDTH:
        threading.Event().wait()  # never returns
    if width == SLOW_WIDTH:
        time.sleep(HOOK_SLOW_S)
    return _detect(network, image, *args, **kwargs)


_decode = predictor.decode_image
_decodes = itertools.count(1)


def hooked_decode(blob, *args, **kwargs):
    if FAULT == "refuse" and next(_decodes) % 10:
        raise predictor.ImageError("HOOK_FAULT=refuse: this image is refused")
    return _decode(blob, *args, **kwargs)


predictor.detect = hooked_detect
predictor.decode_image = hooked_decode

def supervise(argv: list[str], crash_after: int) -> None:
    """Run the predictor with `die:N` and start it again whenever it exits (the kubelet's restart policy);
    each child dies with this process."""
    import ctypes
    import signal
    import subprocess

    def die_with_parent() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    env = {**os.environ, "HOOK_FAULT": f"die:{crash_after}"}
    while True:
        subprocess.run([sys.executable, __file__, *argv], env=env, preexec_fn=die_with_parent, check=False)


if __name__ == "__main__":
    if FAULT.startswith("crash:"):
        supervise(sys.argv[1:], int(FAULT.split(":", 1)[1]))
    sys.exit(main(sys.argv[1:]))
