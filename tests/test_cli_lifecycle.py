"""``medserve up`` and ``down`` as a new user meets them: they print medserve's own progress and no Ray log lines;
``up`` records what it started, so that ``down`` without ``--config`` drains that application; and ``up`` starts a
fresh cluster, within seconds of finding it dead, where the one Ray's current-cluster file names was killed.

One local cluster for the module, in a Ray temporary folder of its own (``RAY_TMPDIR``: its own current-cluster
file too), with its own state folder (``XDG_STATE_HOME``): only its processes are killed, told apart from any
other Ray cluster on this machine by that folder. The tests run in order, on the one application.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from ray_nodes import ray_processes

from helpers import TEST_RAY_ENVIRONMENT, free_port, medserve

pytestmark = [pytest.mark.cluster]

DRAIN_GRACE_S = 60


@dataclass
class LocalServer:
    url: str
    config_path: Path
    storage: Path
    ray_temp_dir: Path
    gcs_port: int
    environment: dict[str, str]
    first_up: subprocess.CompletedProcess

    @property
    def record_file(self) -> Path:
        return Path(self.environment["XDG_STATE_HOME"]) / "medserve" / "up.json"


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> LocalServer:
    root = tmp_path_factory.mktemp("lifecycle")
    ray_temp_dir = Path(tempfile.mkdtemp(prefix="mlc-"))  # short: Ray's socket paths must fit in 107 bytes
    gcs_port, http_port = free_port(), free_port()
    config_path, storage = root / "site.yaml", root / "storage"
    config = {
        "storage": {"root": str(storage)},
        "http": {"port": http_port},
        "ray": {"port": gcs_port},
        "limits": {"drain_grace_s": DRAIN_GRACE_S},
    }
    config_path.write_text(yaml.safe_dump(config))
    # Nothing of the session's cluster (its token, its HAProxy settings, its address) leaks into this one.
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        "RAY_TMPDIR": str(ray_temp_dir),
        "XDG_STATE_HOME": str(root / "state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        **TEST_RAY_ENVIRONMENT,
    }
    try:
        up = medserve("up", "--config", str(config_path), env=environment)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        url = f"http://127.0.0.1:{http_port}"
        yield LocalServer(url, config_path, storage, ray_temp_dir, gcs_port, environment, up)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            medserve("down", "--keep-ray", "--config", str(config_path), env=environment, timeout=120)
        _kill_cluster(ray_temp_dir)
        shutil.rmtree(ray_temp_dir, ignore_errors=True)
        haproxy_folder = (storage / "state" / "haproxy").resolve()
        if not haproxy_folder.is_relative_to(storage):  # the short folder in /tmp it links to
            shutil.rmtree(haproxy_folder, ignore_errors=True)


def _kill_cluster(ray_temp_dir: Path) -> int:
    """SIGKILL every process of the cluster in ``ray_temp_dir``, as the OOM killer would; how many there were.
    Not `ray stop`, which stops every Ray cluster of this machine."""
    processes = ray_processes(ray_temp_dir)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(processes, timeout=30)
    return len(processes)


def _medserve_lines_only(answer: subprocess.CompletedProcess) -> None:
    """Every line the command printed is medserve's own: ``medserve…`` or an indented model of its list."""
    lines = (answer.stdout + answer.stderr).splitlines()
    foreign = [line for line in lines if not line.startswith(("medserve", "  "))]
    assert not foreign and len(lines) <= 10, answer.stdout + answer.stderr


def test_up_prints_its_own_progress_and_where_rays_logs_are(local):
    _medserve_lines_only(local.first_up)
    (logs_line,) = [line for line in local.first_up.stdout.splitlines() if "Ray's logs" in line]
    logs = Path(logs_line.split("Ray's logs: ")[1])
    assert logs.is_relative_to(local.ray_temp_dir) and (logs / "raylet.out").exists()
    assert any(line.startswith(f"medserve is up at {local.url}") for line in local.first_up.stdout.splitlines())


def test_up_records_what_it_started_in_a_file_of_its_users_alone(local):
    record = json.loads(local.record_file.read_text())
    assert record["config"] == str(local.config_path.resolve())
    assert record["storage_root"] == str(local.storage) and record["url"] == local.url and record["address"] is None
    assert stat.S_IMODE(local.record_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(local.record_file.parent.stat().st_mode) == 0o700


def test_up_starts_a_fresh_cluster_when_the_one_ray_names_was_killed(local):
    assert _kill_cluster(local.ray_temp_dir) > 3
    current_cluster = local.ray_temp_dir / "ray" / "ray_current_cluster"
    assert current_cluster.read_text().strip() == f"127.0.0.1:{local.gcs_port}"  # names the dead cluster still

    started = time.monotonic()
    up = medserve("up", "--config", str(local.config_path), env=local.environment, timeout=300)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
    assert "does not answer" in up.stderr and str(current_cluster) in up.stderr
    _medserve_lines_only(up)
    assert time.monotonic() - started < 240
    assert httpx.get(local.url + "/readyz", timeout=10).status_code == 200


def test_down_without_config_drains_the_application_up_started(local):
    def refused_while_draining() -> bool:
        """Whether a new POST is refused with 503 (draining) before the application is gone."""
        deadline = time.monotonic() + DRAIN_GRACE_S
        while time.monotonic() < deadline:
            try:
                answer = httpx.post(local.url + "/v1/models/ct-phantom-organ/segment", content=b"", timeout=10)
            except httpx.HTTPError:  # the application (and its port) gone
                return False
            if answer.status_code == 503:
                return True
            time.sleep(0.1)
        return False

    with ThreadPoolExecutor(1) as pool:
        refusing = pool.submit(refused_while_draining)
        started = time.monotonic()
        down = medserve("down", "--keep-ray", env=local.environment, timeout=300)
        took_s = time.monotonic() - started
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-3000:]
    assert str(local.config_path.resolve()) in down.stdout and "did not answer the drain order" not in down.stderr
    assert refusing.result(), "no new request was refused while the application drained"
    assert took_s < DRAIN_GRACE_S - 10, f"down took {took_s:.0f} s: it waited out the grace period"
    _medserve_lines_only(down)
    assert not local.record_file.exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(local.url + "/readyz", timeout=5).raise_for_status()
