"""KServe's storage-initializer contract: `entrypoint.py SRC_URI DEST_PATH [SRC_URI DEST_PATH ...]`,
downloaded by kserve-storage's `Storage.download_files`; exit 1 with the reason on failure."""

import logging
import os
import sys

from kserve_storage import Storage

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s storage-initializer: %(message)s")
args = sys.argv[1:]
if not args or len(args) % 2:
    sys.exit("usage: entrypoint.py SRC_URI DEST_PATH [SRC_URI DEST_PATH ...]")
sources, destinations = args[0::2], args[1::2]
for destination in destinations:
    os.makedirs(destination, exist_ok=True)
try:
    Storage.download_files(sources, destinations)
except Exception as exc:  # noqa: BLE001 - the init container's log is the only report
    logging.error("storage initialization failed: %s", exc)
    sys.exit(1)
logging.info("downloaded %s", ", ".join(f"{s} -> {d}" for s, d in zip(sources, destinations)))
