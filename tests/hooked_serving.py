"""A test launcher: `python -m serving` with a hook in the forward pass (a test hook, not a stand-in).

An image 13 pixels wide blocks its forward pass for ever (a network that never returns); one 17 pixels
wide takes `HOOK_SLOW_S` seconds (a heavy request, predictable on any machine). Every other image runs
the package's network as usual, unless $HOOK_FAULT says otherwise for every image: `error` (the forward
pass raises, as a broken model or runtime would: the request is answered 500) or `slow:SECONDS` (each
forward pass takes that much longer).

    python tests/hooked_serving.py --model-dir PACKAGE [serving's flags]
"""

from __future__ import annotations

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


def hooked_detect(network, image, *args, **kwargs):
    if FAULT == "error":
        raise RuntimeError("HOOK_FAULT=error: the forward pass failed")
    if FAULT.startswith("slow:"):
        time.sleep(float(FAULT.split(":", 1)[1]))
    width = image.shape[1]  # HxWx3
    if width == STUCK_WIDTH:
        threading.Event().wait()  # never returns
    if width == SLOW_WIDTH:
        time.sleep(HOOK_SLOW_S)
    return _detect(network, image, *args, **kwargs)


predictor.detect = hooked_detect

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
