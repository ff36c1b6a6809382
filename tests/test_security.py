"""A live ``medserve up`` as a hospital's security reviewer tries it: nothing of Ray or medserve listens beyond
loopback, Ray refuses a driver without the cluster's token, HAProxy's sockets are in a folder only medserve's user
can enter, everything under the storage root is private after a study was segmented, and an open server on a
public address is refused before anything starts.

One ``medserve up`` for the module, in a Ray temporary folder of its own (``RAY_TMPDIR``): its processes are told
apart from any other Ray cluster on this machine (the session's test cluster among them) by that folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from ray_nodes import ray_processes

from helpers import SEGMENT, TEST_RAY_ENVIRONMENT, ZIP, free_port, medserve, zip_files
from serve_app.ray_security import TOKEN_FILE_NAME

pytestmark = [pytest.mark.cluster]

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@dataclass
class LiveServer:
    url: str
    config_path: Path
    storage: Path
    ray_temp_dir: Path
    gcs_address: str
    environment: dict[str, str]
    haproxy_ports: set[int]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> LiveServer:
    root = tmp_path_factory.mktemp("security")
    ray_temp_dir = Path(tempfile.mkdtemp(prefix="msec-"))  # short: Ray's socket paths must fit in 107 bytes
    gcs_port, http_port = free_port(), free_port()
    config_path = root / "medserve.yaml"
    storage = root / "storage"
    config = {"storage": {"root": str(storage)}, "http": {"port": http_port}, "ray": {"port": gcs_port}}
    config_path.write_text(yaml.safe_dump(config))
    haproxy_ports = {"RAY_SERVE_HAPROXY_STATS_PORT": free_port(), "RAY_SERVE_HAPROXY_METRICS_PORT": free_port()}
    # Nothing of the session's cluster (its token, its HAProxy settings, its address) leaks into this one.
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        "RAY_TMPDIR": str(ray_temp_dir),
        **{k: str(v) for k, v in haproxy_ports.items()},
        **TEST_RAY_ENVIRONMENT,
    }
    try:
        up = medserve("up", "--config", str(config_path), env=environment)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        yield LiveServer(
            f"http://127.0.0.1:{http_port}",
            config_path,
            storage,
            ray_temp_dir,
            f"127.0.0.1:{gcs_port}",
            environment,
            set(haproxy_ports.values()),
        )
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            medserve("down", "--keep-ray", "--config", str(config_path), env=environment, timeout=120)
        # Not `ray stop`, which stops every Ray cluster of this machine: only this one's processes.
        for process in ray_processes(ray_temp_dir):
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(ray_processes(ray_temp_dir), timeout=30)
        shutil.rmtree(ray_temp_dir, ignore_errors=True)
        haproxy_folder = (storage / "state" / "haproxy").resolve()
        if not haproxy_folder.is_relative_to(storage):  # the short folder in /tmp it links to
            shutil.rmtree(haproxy_folder, ignore_errors=True)


def _listening(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    found = []
    for process in processes:
        try:
            name = process.name()
            found += [
                (name, c.laddr.ip, c.laddr.port)
                for c in process.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.Error:
            continue
    return found


def test_every_socket_of_ray_and_medserve_listens_on_loopback(live):
    processes = ray_processes(live.ray_temp_dir)
    listening = _listening(processes)
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet", "haproxy"} <= names, listening
    assert int(live.gcs_address.rsplit(":", 1)[1]) in {port for name, _, port in listening if name == "gcs_server"}
    # Ray 2.60 binds two kinds of socket to every interface, with no setting for the address: HAProxy's stats and
    # Prometheus pages (`bind *:` in its template; read-only, on ports of our choosing), and each Serve replica's
    # inter-deployment gRPC server (`[::]:0` in serve/_private/replica.py), which Ray's token interceptor guards.
    replica_ports = [port for name, ip, port in listening if name.startswith("ray::ServeReplica:") and ip == "::"]
    beyond = [
        (name, ip, port)
        for name, ip, port in listening
        if ip not in LOOPBACK
        and not (name == "haproxy" and port in live.haproxy_ports)
        and not (name.startswith("ray::ServeReplica:") and ip == "::")
    ]
    assert beyond == [], f"listening beyond loopback: {beyond}"
    assert replica_ports and all(_refuses_without_token(port) for port in replica_ports)
    # No Ray Client server (it would run any code a token holder sends, on 10001 by default).
    cmdlines = [" ".join(p.cmdline()) for p in processes if p.is_running()]
    assert not [c for c in cmdlines if "ray.util.client.server" in c]
    assert 10001 not in {port for _, _, port in listening}


def _refuses_without_token(port: int) -> bool:
    """Whether a replica's gRPC server answers a call that carries no token with UNAUTHENTICATED."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", timeout=10)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def _driver(live, environment: dict[str, str]) -> subprocess.CompletedProcess:
    script = f"import ray; ray.init(address={live.gcs_address!r}, logging_level='ERROR'); print('connected')"
    return subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=180)


def test_a_driver_without_the_token_is_refused_and_one_with_it_connects(live, tmp_path):
    # A HOME of its own: no ~/.ray/auth_token another cluster may have left is found.
    without_token = {
        **{k: v for k, v in live.environment.items() if not k.startswith("RAY_AUTH")},
        "HOME": str(tmp_path),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the cluster's single-machine mode: 127.0.0.1 stays loopback
    }
    refused = _driver(live, without_token)
    assert refused.returncode != 0 and "connected" not in refused.stdout
    assert "AuthenticationError" in refused.stderr or "authentication" in refused.stderr.lower(), refused.stderr
    token_file = live.storage / "state" / TOKEN_FILE_NAME
    with_token = {**without_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    connected = _driver(live, with_token)
    assert connected.returncode == 0 and "connected" in connected.stdout, connected.stderr[-3000:]


def test_haproxy_sockets_are_in_a_folder_only_medserve_can_enter(live):
    folder = (live.storage / "state" / "haproxy").resolve()
    found = folder.stat()
    assert stat.S_IMODE(found.st_mode) == 0o700 and found.st_uid == os.geteuid()
    (admin_socket,) = folder.glob("*/admin.sock")
    assert stat.S_ISSOCK(admin_socket.stat().st_mode)
    haproxy_configs = {
        part
        for process in ray_processes(live.ray_temp_dir)
        if process.name() == "haproxy"
        for part in process.cmdline()
        if part.endswith("haproxy.cfg")
    }
    assert haproxy_configs and all(Path(path).is_relative_to(folder) for path in haproxy_configs)


def test_everything_under_the_storage_root_is_private_after_a_segmentation(live, phantom_series):
    answer = httpx.post(live.url + SEGMENT, content=zip_files(phantom_series), headers=ZIP, timeout=300)
    assert answer.status_code == 200, answer.text
    checked, shared = 0, []
    for folder, subfolders, files in os.walk(live.storage):
        for path in [Path(folder), *(Path(folder) / name for name in (*subfolders, *files))]:
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):  # a link's own mode means nothing: its target is checked above
                continue
            checked += 1
            if stat.S_IMODE(mode) & 0o077:
                shared.append(f"{path} {stat.S_IMODE(mode):04o}")
    assert checked > 5 and not shared, shared
    assert any((live.storage / "results").iterdir())


def test_an_open_server_on_a_public_address_is_refused_before_anything_starts(tmp_path):
    storage = tmp_path / "storage"
    config_path = tmp_path / "open.yaml"
    config_path.write_text(yaml.safe_dump({"storage": {"root": str(storage)}, "http": {"port": free_port()}}))
    refused = medserve("up", "--host", "0.0.0.0", "--config", str(config_path), timeout=120)
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert "http.allow_open" in line
    assert not storage.exists()


def test_down_takes_the_application_down(live):
    down = medserve("down", "--keep-ray", "--config", str(live.config_path), env=live.environment, timeout=300)
    assert down.returncode == 0, down.stderr[-3000:]
    assert down.stdout.splitlines()[-1] == "medserve is down"
    with pytest.raises(httpx.HTTPError):
        httpx.get(live.url + "/readyz", timeout=5).raise_for_status()
