"""A multi-node Ray cluster in containers of the project's image, started the way KubeRay starts its pods:
`ray start --head ... --block` in one container, `ray start --address HEAD --block` in each worker.

Every node has its own filesystem (its own container), shares only the host's network (so every port is
on this machine, and the dashboard and Jobs API listen on 127.0.0.1 only), runs as uid 1000 with no
capabilities, and authenticates with a Ray token from a podman secret in $RAY_AUTH_TOKEN (as KubeRay's
`authOptions: {mode: token}` sets it from a Kubernetes Secret). S3 credentials reach the nodes through the environment (`--env NAME`: never on a command line).
"""

from __future__ import annotations

import logging
import secrets
import urllib.request
from dataclasses import dataclass, field

from devstack.podman import HARDENED, Podman
from devstack.procs import StackError, free_port
from maskrcnn.waiting import WaitTimeout, poll_until

log = logging.getLogger("devstack")

# As ray/raycluster.yaml runs the pods: uid 1000, no capabilities, a read-only root filesystem with
# writable (emptyDir-like) /tmp, /work and cache, and a larger /dev/shm for the object store.
HARDENING = [*HARDENED, "--shm-size", "1g", "--tmpfs", "/tmp:rw,mode=1777", "--tmpfs", "/work:rw,mode=1777",
             "--tmpfs", "/home/app/.cache:rw,mode=1777"]


@dataclass
class RayNodes:
    """Ray head and workers as podman containers. `env`: variables the nodes need (S3 keys, endpoints)."""

    podman: Podman
    image: str
    env: dict[str, str] = field(default_factory=dict)
    cpus_per_node: int = 1
    prefix: str = field(default_factory=lambda: f"ray-{secrets.token_hex(3)}")
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    workers: list[str] = field(default_factory=list)
    port_blocks: set[int] = field(default_factory=set)
    agent_ports: dict[str, int] = field(default_factory=dict)

    @property
    def head(self) -> str:
        return f"{self.prefix}-head"

    @property
    def jobs_url(self) -> str:
        """The Jobs API (KubeRay: http://<cluster>-head-svc.<namespace>.svc:8265)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_secret(self) -> str:
        return f"{self.prefix}-token"

    def start(self, workers: int = 1, timeout: float = 120) -> RayNodes:
        """Start the head and `workers` workers and wait for them all; on failure, remove what started."""
        self.token = secrets.token_hex(32)
        self.podman("secret", "create", self.token_secret, "-", input=self.token)
        try:
            self._run(self.head, "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                      f"--ray-client-server-port={free_port()}")
            for _ in range(workers):
                self.add_worker()
            self.wait_for_nodes(1 + workers, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self) -> str:
        name = f"{self.prefix}-worker-{len(self.workers)}"
        self._run(name, f"--address=127.0.0.1:{self.gcs_port}")
        self.workers.append(name)
        return name

    def kill(self, name: str) -> None:
        """What a lost node looks like: SIGKILL, no clean shutdown."""
        self.podman("kill", "--signal", "KILL", name)

    def client_env(self) -> dict[str, str]:
        """What a client of this cluster (a job submitter) needs: token authentication and the token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def alive_nodes(self) -> int:
        import json

        req = urllib.request.Request(f"{self.jobs_url}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            summary = json.loads(resp.read())["data"]["summary"]
        return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        try:  # the dashboard refuses connections until it is up: a transient error
            poll_until(lambda: True if self.alive_nodes() >= count else None, timeout=timeout, interval=1,
                       what=f"the Ray cluster reaching {count} nodes", transient=lambda e: isinstance(e, OSError))
        except WaitTimeout:
            logs = "\n".join(f"--- {name}:\n" + self.podman.logs(name, 2000)
                              for name in [self.head, *self.workers])
            raise StackError(f"the Ray cluster did not reach {count} nodes in {timeout:.0f} s; logs:\n{logs}") from None

    def stop(self) -> None:
        for name in [*self.workers, self.head]:  # also those that were created but never started
            self.podman("rm", "-f", "-t", "0", name, check=False)
        self.podman("secret", "rm", self.token_secret, check=False)

    def _worker_ports(self, span: int = 200) -> int:
        """The first of `span` ports for a node's workers: a block of its own, below the kernel's ephemeral
        range (where `free_port` draws every other port), so no node's port falls in any worker range."""
        low, _ = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        for base in range(max(20000, low - 12000), low - span, span):
            if base not in self.port_blocks:
                self.port_blocks.add(base)
                return base
        raise StackError("no free block of worker ports below the ephemeral range")

    def _run(self, name: str, *ray_args: str) -> None:
        base, span = self._worker_ports(), 200
        self.agent_ports[name] = free_port()  # its /api/healthz is what the pods' probes call
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={self.agent_ports[name]}",
                 f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                 f"--min-worker-port={base}", f"--max-worker-port={base + span}"]
        env = {"RAY_AUTH_MODE": "token", **self.env}
        self.podman("run", "--detach", "--name", name, *HARDENING,
                    "--secret", f"{self.token_secret},type=env,target=RAY_AUTH_TOKEN",
                    *[a for key in env for a in ("--env", key)], self.image,
                    "ray", "start", *ray_args, "--disable-usage-stats", f"--num-cpus={self.cpus_per_node}", *ports, "--block",
                    env=env)
