"""Prometheus, the GPU exporter and (where installed) Grafana on loopback, wired to the Ray cluster.

``medserve up --monitoring`` calls ``start``; ``medserve down`` calls ``stop``. The processes are
detached from the command (they outlive it) and their ids are kept in ``STATE_DIR``.
The configuration is the one in ``dashboards/`` (this checkout's; install medserve editable).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from serve_app.config import default_storage_root
from serve_app.storage import private_folder

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
# The processes' ids, configs and logs: a private folder, never one in /tmp that another user could create first
# and fill with ids for `stop` to kill.
STATE_DIR = Path(os.environ.get("MEDSERVE_MONITORING_DIR") or default_storage_root() / "state" / "monitoring")
RAY_SERVICE_DISCOVERY_FILE = Path("/tmp/ray/prom_metrics_service_discovery.json")


@dataclass(frozen=True)
class Ports:
    prometheus: int = 9090
    gpu_exporter: int = 9835
    grafana: int = 3000


def find_binary(name: str) -> str | None:
    """``name`` on PATH, else where Debian's packages put it."""
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/usr/sbin") / name) if p.exists()), None
    )


def prometheus_config(
    service_discovery_file: Path = RAY_SERVICE_DISCOVERY_FILE,
    gpu_exporter_port: int = Ports.gpu_exporter,
    scrape_interval: str | None = None,
    rule_files: list[Path] | None = None,
) -> dict:
    """``dashboards/prometheus.yml`` with the service-discovery file and GPU exporter port given, and its rule files
    (``rule_files``, else the file's own) by absolute path: the config is written elsewhere."""
    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    config["rule_files"] = [str(p) for p in rule_files or [DASHBOARDS / f for f in config.get("rule_files", [])]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["ray"]["file_sd_configs"] = [{"files": [str(service_discovery_file)]}]
    jobs["medserve-gpu"]["static_configs"] = [{"targets": [f"127.0.0.1:{gpu_exporter_port}"]}]
    if scrape_interval:
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = scrape_interval
    return config


def start_prometheus(config: dict, port: int, state_dir: Path) -> subprocess.Popen:
    binary = find_binary("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus)")
    private_folder(state_dir)
    config_file = state_dir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={state_dir / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return _spawn("prometheus", command, state_dir)


def start_gpu_exporter(port: int, state_dir: Path) -> subprocess.Popen:
    return _spawn(
        "gpu-exporter", [sys.executable, "-m", "serve_app.observability.gpu_exporter", "--port", str(port)], state_dir
    )


def start_grafana(port: int, prometheus_port: int, state_dir: Path) -> subprocess.Popen | None:
    """Grafana with the datasource and dashboards provisioned, or None where it is not installed."""
    binary = find_binary("grafana") or find_binary("grafana-server")
    if binary is None:
        return None
    env = {
        "GF_SERVER_HTTP_ADDR": "127.0.0.1",
        "GF_SERVER_HTTP_PORT": str(port),
        "GF_PATHS_DATA": str(state_dir / "grafana-data"),
        "GF_PATHS_PROVISIONING": str(DASHBOARDS / "grafana" / "provisioning"),
        "MEDSERVE_PROMETHEUS_URL": f"http://127.0.0.1:{prometheus_port}",
        "MEDSERVE_DASHBOARDS_DIR": str(DASHBOARDS / "grafana" / "dashboards"),
    }
    # `grafana server` since Grafana 10; `grafana-server` before.
    command = [binary, "server"] if Path(binary).name == "grafana" else [binary]
    homepath = Path("/usr/share/grafana")
    if homepath.exists():
        command.append(f"--homepath={homepath}")
    return _spawn("grafana", command, state_dir, env)


def start(ports: Ports = Ports(), state_dir: Path = STATE_DIR) -> dict[str, str]:
    """Start everything that is installed; return ``{name: url}``."""
    stop(state_dir)
    urls = {}
    start_gpu_exporter(ports.gpu_exporter, state_dir)
    urls["gpu-exporter"] = f"http://127.0.0.1:{ports.gpu_exporter}/metrics"
    start_prometheus(prometheus_config(gpu_exporter_port=ports.gpu_exporter), ports.prometheus, state_dir)
    urls["prometheus"] = f"http://127.0.0.1:{ports.prometheus}"
    if start_grafana(ports.grafana, ports.prometheus, state_dir):
        urls["grafana"] = f"http://127.0.0.1:{ports.grafana}"
    return urls


def stop(state_dir: Path = STATE_DIR, grace_s: float = 10.0) -> list[str]:
    """Stop the processes ``start`` left running, each killed if it is still there after ``grace_s``; return their
    names once they are gone (their ports free)."""
    stopped = []
    if not state_dir.is_dir():
        return stopped
    private_folder(state_dir)  # process ids to kill are read only from a folder no one else can write
    for pid_file in sorted(state_dir.glob("*.pid")):
        try:
            group = int(pid_file.read_text())
            os.killpg(group, signal.SIGTERM)
            _wait_gone(group, grace_s)
            stopped.append(pid_file.stem)
        except (ProcessLookupError, ValueError):
            pass
        pid_file.unlink()
    return stopped


def _wait_gone(group: int, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(group, os.WNOHANG)  # reaped here when this process started it (`medserve up` in one process)
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(group, signal.SIGKILL)


def _spawn(name: str, command: list[str], state_dir: Path, env: dict | None = None) -> subprocess.Popen:
    private_folder(state_dir)
    with open(state_dir / f"{name}.log", "ab") as log:
        # A session of its own: the process outlives `medserve up`, and `stop` ends it with its children.
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    (state_dir / f"{name}.pid").write_text(str(process.pid))
    return process
