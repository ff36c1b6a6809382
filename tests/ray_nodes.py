"""A multi-node Ray cluster on this one machine, as ``ray start`` makes one on many: a head whose GCS keeps its
state in a real Redis (Debian's ``redis-server``), and worker nodes with resources of their own. The fault tests
stop its parts the way a machine's failure would: a node's raylet and workers SIGKILLed, the head's GCS
SIGKILLed and started again (as a supervisor or KubeRay restarts it).

The test process never connects to this cluster (it may be connected to the session's own): it deploys through
``medserve up --address`` and asks Serve's state through a child process, the way an operator does.

Usage::

    cluster = RayNodes(tmp_path, environment={"RAY_SERVE_ENABLE_HA_PROXY": "1"})
    cluster.start_head()
    cluster.add_worker("gpu-a", cpus=2, resources={"model_slot": 4})
    ...
    cluster.stop_node("gpu-a")
    cluster.shutdown()
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from helpers import TEST_RAY_ENVIRONMENT, free_port, medserve
from serve_app.config import HttpConfig
from serve_app.ray_security import haproxy_environment, token_environment

__all__ = ["RayNode", "RayNodes", "Redis", "deploy", "ray_nodes", "ray_processes", "replica_title"]

_RAY = str(Path(sys.executable).with_name("ray"))
# Ray renames a Serve replica's worker process after its actor: "ray::ServeReplica:<app>:<deployment>".
_REPLICA_TITLE = "ray::ServeReplica:"


def replica_title(app: str, deployment: str) -> str:
    return f"{_REPLICA_TITLE}{app}:{deployment}"


class Redis:
    """A redis-server on a free loopback port, nothing persisted: the GCS's external store."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not _accepts(self.port):
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.1)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)


@dataclass
class RayNode:
    """One ``ray start`` node; its raylet is the process listening on ``node_manager_port``."""

    name: str
    node_manager_port: int
    metrics_export_port: int  # where its metrics agent serves Prometheus text: its replicas' metrics among them
    resources: dict[str, float]

    def raylet(self) -> psutil.Process | None:
        flag = f"--node_manager_port={self.node_manager_port}"
        for process in psutil.process_iter(["name", "cmdline"]):
            try:
                if process.info["name"] == "raylet" and flag in (process.info["cmdline"] or []):
                    return process
            except psutil.Error:
                continue
        return None

    def processes(self) -> list[psutil.Process]:
        """The raylet and everything it started: workers (Serve's replicas among them), agents, HAProxy."""
        raylet = self.raylet()
        return [] if raylet is None else [raylet, *raylet.children(recursive=True)]

    def replicas(self) -> list[str]:
        """The Serve replicas on this node, by process title: ``ray::ServeReplica:<app>:<deployment>``."""
        titles = []
        for process in self.processes():
            try:
                title = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if title.startswith(_REPLICA_TITLE):
                titles.append(title.split()[0])
        return titles


class RayNodes:
    """A head and worker nodes started with ``ray start`` on loopback, GCS fault tolerance against ``redis``."""

    def __init__(self, workdir: Path, redis: Redis, environment: dict[str, str]):
        self.workdir = workdir
        # Ray's own files, under a short path: its sockets' paths must fit in 107 bytes.
        self.ray_temp_dir = Path(tempfile.mkdtemp(prefix="ray-nodes-"))
        self.redis = redis
        self.gcs_port = free_port()
        self.nodes: dict[str, RayNode] = {}
        self._environment = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray's token authentication, with a token of this cluster's own: every node and client is given it
            # (without it, whether a node enables it depends on a ~/.ray/auth_token another cluster may have left).
            **token_environment(),
            # HAProxy's sockets private, in Ray's own folder: short enough for HAProxy's socket paths (97 bytes).
            **haproxy_environment(self.ray_temp_dir),
            # GCS fault tolerance: the GCS keeps its tables in Redis, and a raylet waits this long for a
            # restarted GCS before it gives up.
            "RAY_REDIS_ADDRESS": redis.address,
            "RAY_external_storage_namespace": f"medserve-{self.gcs_port}",
            "RAY_gcs_rpc_server_reconnect_timeout_s": "120",
            **TEST_RAY_ENVIRONMENT,
            **environment,
        }
        self._gcs_command: tuple[list[str], str, dict[str, str]] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def client_environment(self) -> dict[str, str]:
        """The environment a process that joins this cluster (``medserve up --address``) runs with."""
        return dict(self._environment)

    def start_head(self, resources: dict[str, float] | None = None) -> RayNode:
        """The head: Serve's controller and ingress proxy, and no CPUs for replicas (as the KubeRay head)."""
        return self._start(
            "head", ["--head", f"--port={self.gcs_port}", f"--temp-dir={self.ray_temp_dir}",
                     "--include-dashboard=false", f"--ray-client-server-port={free_port()}"],
            cpus=0, resources=resources or {},
        )  # fmt: skip

    def add_worker(self, name: str, *, cpus: float, resources: dict[str, float], gpus: int = 0) -> RayNode:
        """A worker node; ``gpus`` it claims to have (Ray schedules them, and sets each replica's
        CUDA_VISIBLE_DEVICES, whether or not they exist: on a CPU machine nothing runs CUDA)."""
        return self._start(name, [f"--address={self.address}", f"--num-gpus={gpus}"], cpus=cpus, resources=resources)

    def _start(self, name: str, role: list[str], *, cpus: float, resources: dict[str, float]) -> RayNode:
        node = RayNode(name, free_port(), free_port(), resources)
        # Every port of its own: several nodes share this machine's one address.
        ports = [
            f"--node-manager-port={node.node_manager_port}",
            f"--object-manager-port={free_port()}",
            f"--metrics-export-port={node.metrics_export_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]
        command = [_RAY, "start", *role, "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                   f"--resources={json.dumps(resources)}", "--disable-usage-stats", *ports]  # fmt: skip
        # Into a file, not a pipe: the node's daemons inherit ray start's output and outlive it.
        log = self.workdir / f"ray-start-{name}.log"
        with log.open("w") as out:
            started = subprocess.run(command, env=self._environment, stdout=out, stderr=subprocess.STDOUT, timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{log.read_text()[-3000:]}")
        self.nodes[name] = node
        return node

    def stop_node(self, name: str) -> int:
        """SIGKILL a node's raylet and every process it started, as a machine's failure would. Returns how many."""
        processes = self.nodes.pop(name).processes()
        for process in processes:
            _kill(process)
        return len(processes)

    def gcs_server(self) -> psutil.Process:
        for process in psutil.process_iter(["name", "cmdline"]):
            try:
                cmdline = process.info["cmdline"] or []
                if process.info["name"] == "gcs_server" and f"--gcs_server_port={self.gcs_port}" in cmdline:
                    return process
            except psutil.Error:
                continue
        raise LookupError(f"no gcs_server on port {self.gcs_port}")

    def kill_gcs(self) -> None:
        """SIGKILL the head's GCS, remembering how it was started."""
        gcs = self.gcs_server()
        self._gcs_command = (gcs.cmdline(), gcs.cwd(), gcs.environ())
        _kill(gcs)

    def restart_gcs(self) -> None:
        """Start the GCS again as it was: it reloads the cluster's state from Redis, and the raylets reconnect."""
        assert self._gcs_command is not None, "kill_gcs first"
        command, cwd, environment = self._gcs_command
        subprocess.Popen(command, cwd=cwd, env=environment, start_new_session=True, stdout=subprocess.DEVNULL)

    def replicas(self) -> dict[str, list[str]]:
        """Each node's Serve replicas, by process title."""
        return {name: sorted(node.replicas()) for name, node in self.nodes.items()}

    def shutdown(self) -> None:
        """Every process of this cluster, and nothing of another Ray cluster on this machine."""
        stray = ray_processes(self.ray_temp_dir)
        for node in list(self.nodes.values()):
            stray.extend(node.processes())
        for process in stray:
            _kill(process)
        self.nodes.clear()
        shutil.rmtree(self.ray_temp_dir, ignore_errors=True)


@contextmanager
def ray_nodes(workdir: Path) -> Iterator[RayNodes]:
    """A Redis and a cluster with no node yet, its ingress Ray's HAProxy on free ports; all stopped after."""
    redis = Redis(workdir)
    environment = {
        **HttpConfig(ingress="haproxy").ray_environment(),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }
    cluster = RayNodes(workdir, redis, environment)
    try:
        yield cluster
    finally:
        cluster.shutdown()
        redis.stop()


def ray_processes(temp_dir: Path) -> list[psutil.Process]:
    """The processes of the Ray cluster whose temporary folder is ``temp_dir`` (``--temp-dir``, ``RAY_TMPDIR``):
    those that name it on their command line, and what they started (workers rename themselves ``ray::…``, and
    HAProxy names only its own config)."""
    ours = str(temp_dir)
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid != os.getpid() and any(ours in part for part in process.info["cmdline"] or []):
                found[process.pid] = process
                found.update((child.pid, child) for child in process.children(recursive=True))
        except psutil.Error:
            continue
    return list(found.values())


def deploy(nodes: RayNodes, config_path: Path) -> None:
    """``medserve up --address`` with the application YAML at ``config_path``, as an operator runs it."""
    answer = medserve("up", "--address", nodes.address, "--config", str(config_path), env=nodes.client_environment)
    assert answer.returncode == 0, answer.stdout[-2000:] + answer.stderr[-3000:]


def _kill(process: psutil.Process) -> None:
    try:
        process.send_signal(signal.SIGKILL)
    except psutil.Error:
        pass


def _accepts(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
