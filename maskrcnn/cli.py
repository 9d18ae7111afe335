"""The commands' one error tail: a user's mistake (a bad flag, file, dataset or package) is one logged line
naming the file, field and rule, and an exit status; never a traceback. Every `python -m ...` command's
`main` runs its body through `run`, with its table of error types and statuses.

    return cli.run(lambda: _train(args), {(ConfigError, DatasetError): 2, ModelUploadError: 1}, log)
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

Errors = type[BaseException] | tuple[type[BaseException], ...]


def run(body: Callable[[], int], exits: Mapping[Errors, int], logger: logging.Logger, prefix: str = "") -> int:
    """`body()`'s exit status; an error of a type in `exits` (first match, in order) is logged as its message
    (after `prefix`) and its status is returned. Any other error propagates: a bug keeps its traceback."""
    try:
        return body()
    except BaseException as exc:
        for types, status in exits.items():
            if isinstance(exc, types):
                logger.error("%s%s", prefix, exc)
                return status
        raise
