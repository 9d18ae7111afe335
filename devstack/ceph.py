"""A real S3 server without Docker: Ceph's RADOS Gateway on one monitor and one OSD, on 127.0.0.1.

No MinIO binary can be installed from Debian or PyPI, so the local stack uses Debian's Ceph
(`apt-get install radosgw ceph-mon ceph-osd ceph-common`). The OSD keeps its objects in BlueStore on a
sparse file in the stack folder, so buckets survive `down`/`up`. Daemons stop in order (gateway, OSD,
monitor): stopping the gateway and the OSD together can leave the gateway waiting on the OSD for minutes.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from devstack.procs import StackError, port_open, require_binary, run, running_pid, stop_pid, tail, wait_for, write_private
from maskrcnn.waiting import WaitTimeout, poll_until

log = logging.getLogger(__name__)

HINT = "install Ceph's S3 gateway (Debian: `apt-get install radosgw ceph-mon ceph-osd ceph-common`)"
BLOCK_SIZE = 8 << 30  # sparse: takes only what is written
DAEMONS = {"mon.a": "ceph-mon", "osd.0": "ceph-osd", "client.rgw.a": "radosgw"}  # name -> its program


class CephS3:
    """One monitor, one BlueStore OSD and one RADOS Gateway serving S3 on 127.0.0.1:`port`."""

    def __init__(self, root: Path, port: int, mon_port: int, access_key: str, secret_key: str):
        self.root, self.port, self.mon_port = root, port, mon_port
        self.access_key, self.secret_key = access_key, secret_key
        self.conf = root / "ceph.conf"
        self.run_dir, self.log_dir = root / "run", root / "log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _bin(self, name: str) -> str:
        return require_binary(name, HINT)

    def _ceph(self, *args: str, what: str = "ceph") -> str:
        return run([self._bin("ceph"), "-c", str(self.conf), "--connect-timeout", "30", *args], what)

    def initialized(self) -> bool:
        return (self.root / "initialized").is_file()

    def _write_conf(self, fsid: str) -> None:
        r = self.root
        self.conf.write_text(f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{self.mon_port}
mon_initial_members = a
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = {r}/$cluster.$name.keyring
run_dir = {r}/run
admin_socket = {r}/run/$cluster-$name.asok
log_file = {r}/log/$cluster-$name.log
pid_file = {r}/run/$cluster-$name.pid
mon_data = {r}/mon/$cluster-$id
osd_data = {r}/osd/$cluster-$id
ms_bind_ipv6 = false
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
mon_data_avail_warn = 2
mon_data_avail_crit = 1
osd_objectstore = bluestore
bluestore_block_path = {r}/osd/$cluster-$id.block
bluestore_block_create = true
bluestore_block_size = {BLOCK_SIZE}
bluestore_cache_size = 134217728
osd_memory_target = 939524096

[osd]
keyring = {r}/osd/$cluster-$id/keyring

[client.rgw.a]
keyring = {r}/rgw/keyring
rgw_data = {r}/rgw
rgw_frontends = beast endpoint=127.0.0.1:{self.port}
rgw_dns_name = 127.0.0.1
""")

    def init(self) -> tuple[str, str]:
        """Create the cluster (keys, monitor, OSD), then start it and create the S3 user; no-op if it exists."""
        if self.initialized():
            return self.access_key, self.secret_key
        for name in ("ceph-authtool", "monmaptool", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph"):
            self._bin(name)
        r = self.root
        for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0", "rgw"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self._write_conf(fsid)
        mon_keyring, admin_keyring = r / "ceph.mon.a.keyring", r / "ceph.client.admin.keyring"
        tool = self._bin("ceph-authtool")
        run([tool, "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"], "Ceph keys")
        run([tool, "--create-keyring", str(admin_keyring), "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
             "--cap", "osd", "allow *", "--cap", "mgr", "allow *"], "Ceph keys")
        run([tool, str(mon_keyring), "--import-keyring", str(admin_keyring)], "Ceph keys")
        monmap = r / "monmap"
        run([self._bin("monmaptool"), "--create", "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", "--fsid", fsid,
             str(monmap)], "Ceph monitor map")
        run([self._bin("ceph-mon"), "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring",
             str(mon_keyring)], "Ceph monitor mkfs")
        self._start_mon()
        osd_uuid = str(uuid.uuid4())
        self._ceph("osd", "new", osd_uuid, what="Ceph OSD id")
        run([self._bin("ceph-osd"), "-c", str(self.conf), "-i", "0", "--mkfs", "--mkkey", "--osd-uuid", osd_uuid,
             "--no-mon-config"], "Ceph OSD mkfs (BlueStore)")
        self._ceph("auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd", "mgr", "allow profile osd",
                   "-i", str(r / "osd/ceph-0/keyring"), what="Ceph OSD key")
        rgw_key = self._ceph("auth", "get-or-create", "client.rgw.a", "mon", "allow rw", "osd", "allow rwx",
                             what="Ceph gateway key")
        write_private(r / "rgw/keyring", rgw_key)
        self._start_osd()
        self._start_rgw()
        # The gateway generates the keys and prints them: no secret on a command line.
        user = json.loads(run([self._bin("radosgw-admin"), "-c", str(self.conf), "user", "create", "--uid", "stack",
                               "--display-name", "local stack", "--gen-access-key", "--gen-secret"], "Ceph S3 user"))
        key = next(k for k in user["keys"] if k["user"] == "stack")
        self.access_key, self.secret_key = key["access_key"], key["secret_key"]
        self.lock_keyrings()
        (r / "initialized").write_text(fsid + "\n")
        log.info("Ceph: new cluster %s in %s", fsid, r)
        return self.access_key, self.secret_key

    def lock_keyrings(self) -> None:
        """Keyrings are secrets: owner-only (ceph-authtool and ceph-osd --mkkey create them world-readable)."""
        for path in self.root.rglob("*keyring*"):
            if path.is_file():
                path.chmod(0o600)

    def _pid(self, name: str) -> int | None:
        return running_pid(self.run_dir / f"ceph-{name}.pid", DAEMONS[name])

    def _log(self, name: str) -> Path:
        return self.log_dir / f"ceph-{name}.log"

    def _daemon(self, name: str, argv: list[str], ready, timeout: float) -> None:
        if self._pid(name) is not None:
            return
        try:
            run(argv, f"Ceph {name} start")
        except StackError as exc:
            raise StackError(f"{exc}\nlast lines of {self._log(name)}:\n{tail(self._log(name))}") from None
        wait_for(lambda: self._pid(name) is not None or ready(), f"Ceph {name}", 10, self._log(name))
        wait_for(ready, f"Ceph {name}", timeout, self._log(name), pid=self._pid(name), interval=0.5)

    def _start_mon(self, timeout: float = 60) -> None:
        self._daemon("mon.a", [self._bin("ceph-mon"), "-c", str(self.conf), "-i", "a"],
                     lambda: port_open(self.mon_port), timeout)

    def _osd_up(self) -> bool:
        try:
            return " 1 up" in self._ceph("osd", "stat", what="Ceph OSD status")
        except StackError:
            return False

    def _start_osd(self, timeout: float = 90) -> None:
        self._daemon("osd.0", [self._bin("ceph-osd"), "-c", str(self.conf), "-i", "0"], self._osd_up, timeout)

    def _start_rgw(self, timeout: float = 90) -> None:
        self._daemon("client.rgw.a", [self._bin("radosgw"), "-c", str(self.conf), "-n", "client.rgw.a"],
                     lambda: port_open(self.port), timeout)

    def start(self) -> None:
        if not self.initialized():
            raise StackError(f"Ceph: no cluster in {self.root} (run `up` to create it)")
        self.lock_keyrings()  # stacks made before keyrings were locked down
        self._start_mon()
        self._start_osd()
        self._start_rgw()

    def stop_gateway(self) -> None:
        pid = self._pid("client.rgw.a")
        if pid is not None:
            stop_pid(pid, "Ceph gateway")

    def start_gateway(self) -> None:
        self._start_rgw()

    def stop(self) -> None:
        """Gateway, then OSD, then monitor: each waits for the previous to be gone."""
        for name, what in (("client.rgw.a", "Ceph gateway"), ("osd.0", "Ceph OSD"), ("mon.a", "Ceph monitor")):
            pid = self._pid(name)
            if pid is not None:
                stop_pid(pid, what, timeout=60)

    def pids(self) -> dict[str, int | None]:
        return {"ceph-mon": self._pid("mon.a"), "ceph-osd": self._pid("osd.0"), "radosgw": self._pid("client.rgw.a")}

    def ensure_bucket(self, bucket: str, timeout: float = 60) -> None:
        """Create a private bucket if it does not exist (the first request also creates the gateway's pools)."""
        import boto3
        from botocore.exceptions import ClientError

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                          aws_secret_access_key=self.secret_key, region_name="us-east-1")
        def exists_or_created() -> bool:
            try:
                s3.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code", "") not in ("404", "NoSuchBucket", "NotFound"):
                    raise  # the gateway is still creating its pools: polled through
                s3.create_bucket(Bucket=bucket, ACL="private")
            return True

        try:
            poll_until(exists_or_created, timeout=timeout, interval=1, what=f"Ceph S3: bucket {bucket!r}",
                       transient=lambda e: isinstance(e, ClientError))
        except WaitTimeout as exc:
            raise StackError(f"Ceph S3: bucket {bucket!r} at {self.endpoint}: {exc}") from None
