"""`uv run -m devstack up|down|status|env`: the local MLflow stack on 127.0.0.1.
`uv run -m devstack image`: build the project's image with podman, offline (mmdebstrap base).
`uv run -m devstack rehearse`: the whole cluster path in containers on this machine (see devstack/rehearse.py).
`uv run -m devstack monitoring --target 127.0.0.1:8080`: Prometheus (the project's rules) and Alertmanager on
127.0.0.1, scraping a running predictor, until Ctrl-C (see devstack/monitoring.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from devstack.local import LocalStack, Ports
from devstack.procs import StackError
from maskrcnn.logs import setup_logging

log = logging.getLogger("devstack")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "env", "image", "serving-image", "rehearse", "monitoring"])
    parser.add_argument("--dir", type=Path, default=None, help="stack folder (default $MASKRCNN_STACK_DIR or ./.stack)")
    defaults = Ports()
    parser.add_argument("--postgres-port", type=int, help=f"first `up` only (default {defaults.postgres})")
    parser.add_argument("--s3-port", type=int, help=f"first `up` only (default {defaults.s3})")
    parser.add_argument("--ceph-mon-port", type=int, help=f"first `up` only (default {defaults.ceph_mon})")
    parser.add_argument("--mlflow-port", type=int, help=f"first `up` only (default {defaults.mlflow})")
    parser.add_argument("--work", type=Path, default=Path(".rehearsal"),
                        help="image/rehearse: podman settings, pipeline root and the model volume (default ./.rehearsal)")
    parser.add_argument("--port", type=int, default=8080, help="rehearse: the predictor's port on 127.0.0.1")
    parser.add_argument("--target", action="append", default=None,
                        help="monitoring: a predictor to scrape, host:port (repeatable; default 127.0.0.1:8080)")
    parser.add_argument("--webhook", default=None, help="monitoring: where Alertmanager posts alerts (default: nowhere)")
    return parser


def exports(stack: LocalStack) -> str:
    return "\n".join(f"export {k}={v}" for k, v in stack.env().items())


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    given = {k: v for k, v in (("postgres", args.postgres_port), ("s3", args.s3_port), ("ceph_mon", args.ceph_mon_port),
                                ("mlflow", args.mlflow_port)) if v is not None}
    stack = LocalStack(args.dir, Ports(**given) if given else None)
    try:
        if args.command in ("image", "serving-image"):
            from devstack.podman import Podman
            from training.tracking import git_commit

            podman = Podman(args.work.resolve() / "podman")
            build = podman.build if args.command == "image" else podman.build_serving
            tag, seconds = build(git_commit=git_commit())
            log.info("%s: %s, %.2f GB", tag, f"built in {seconds:.0f} s" if seconds else "up to date", podman.size(tag) / 1e9)
            print(tag)
        elif args.command == "rehearse":
            from devstack.rehearse import rehearse

            timings = rehearse(stack, args.work.resolve(), args.port)
            for stage, seconds in timings.items():
                print(f"{stage:24s} {seconds:7.1f} s")
        elif args.command == "monitoring":
            import signal
            import time

            from devstack import monitoring

            root = (args.dir or Path(".stack")).resolve() / "monitoring"
            mon = monitoring.start(root, args.target or ["127.0.0.1:8080"], [monitoring.RULES], webhook=args.webhook,
                                   scrape_interval="15s", evaluation_interval="30s")
            log.info("Prometheus at %s (rules: %s), Alertmanager at %s; Ctrl-C stops both", mon.prometheus_url,
                     monitoring.RULES, mon.alertmanager_url)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop both on SIGTERM too
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
            finally:
                mon.stop()
        elif args.command == "up":
            stack.up()
            log.info("stack is up in %s; MLflow UI at %s", stack.root, stack.tracking_uri)
            print(f"# export these (or: eval \"$(uv run -m devstack env)\")\n{exports(stack)}")
        elif args.command == "down":
            stack.down()
            log.info("stack stopped; data kept in %s", stack.root)
        elif args.command == "env":
            print(exports(stack))
        else:
            status = stack.status()
            for name, pid in status.items():
                print(f"{name:10s} {'running, pid ' + str(pid) if pid else 'stopped'}")
            return 0 if all(status.values()) else 3
    except StackError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
