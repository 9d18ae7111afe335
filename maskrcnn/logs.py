"""One logging set-up for every entry point (the CLIs, Ray workers, the predictor, the pipeline's steps)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO, fmt: str = FORMAT, force: bool = False) -> None:
    """Log to stderr with timestamps and the logger's name.

    `force=True` replaces handlers someone else installed first (Ray's worker processes do); the CLIs
    leave existing handlers alone, so a caller's (or pytest's) capture keeps working.
    """
    logging.basicConfig(level=level, format=fmt, force=force)
