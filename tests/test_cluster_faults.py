"""medserve on a multi-node Ray cluster, and the faults it survives under load with nothing lost.

A head (Serve's controller and HAProxy ingress; GCS state in a real Redis), a CPU node for the ingress and the CPU
stages, and two "GPU-like" nodes that alone have the ``model_slot`` resource the model replicas ask for: four
``ray start`` processes on this machine. medserve is deployed there with ``medserve up --address``, two replicas of
every stage. Then, each under 8 clients for 30 s, one fault at the 10th second: a model replica SIGKILLed, a GPU
node's raylet and workers SIGKILLed, an ingress replica SIGKILLed, the GCS SIGKILLed and restarted, a new model
version rolled out; last, ``medserve down`` drains it under load. Every request must complete, after at most a
retry the server asked for (503 + Retry-After) or a dropped connection forced; no other error, none past its
deadline; every answered result readable; no more requests retried than were in flight at the fault; the cluster
back to full strength by itself.

The counts of each fault are printed at the end of the test run (``pytest_terminal_summary`` in conftest.py).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import nibabel as nib
import psutil
import pytest
import yaml
from fault_load import SUMMARY, run_load
from ray_nodes import RayNodes, deploy, ray_nodes, replica_title

from helpers import MODEL, SEGMENT, TEST_MAX_VOXELS, free_port, medserve, skip_unless_installed
from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.errors import SHUTDOWN_RETRY_S

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

APP = "medserve-faults"
REPLICAS = {"Ingress": 2, "Preprocess": 2, "Postprocess": 2, f"ModelReplica:{MODEL}": 2}
CLIENTS = 8
LOAD_S = 25
FAULT_AT_S = 5  # the clients all busy by then: each has a request in flight at the fault
DEADLINE_S = 60
FULL_STRENGTH_WAIT_S = 180

FAULTS_HEADING = f"faults under load ({CLIENTS} clients, {LOAD_S} s each, the fault at {FAULT_AT_S} s)"


@dataclass
class FaultsApp:
    url: str
    config_path: Path
    model_yaml: Path


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> RayNodes:
    if shutil.which("redis-server") is None:
        skip_unless_installed("redis-server", "redis-server is not installed (Debian redis-server)")
    with ray_nodes(tmp_path_factory.mktemp("nodes")) as cluster:
        cluster.start_head()
        cluster.add_worker("cpu", cpus=2, resources={"stage_slot": 8})
        cluster.add_worker("gpu-a", cpus=1, resources={"model_slot": 4})
        cluster.add_worker("gpu-b", cpus=1, resources={"model_slot": 4})
        yield cluster


@pytest.fixture(scope="module")
def faults_app(nodes, tmp_path_factory) -> FaultsApp:
    """medserve deployed on ``nodes`` by ``medserve up --address``, from a model repository of its own."""
    root = tmp_path_factory.mktemp("faults-app")
    shutil.copytree(EMBEDDED_MODEL_REPOSITORY / MODEL, root / "models" / MODEL)
    on_cpu_node = {"num_cpus": 0, "resources": {"stage_slot": 1}}
    config = {
        "name": APP,
        "layout": "split",
        "model_repository": "models",
        "storage": {"root": str(root / "storage")},
        "http": {"port": free_port(), "proxy_location": "HeadOnly"},  # four nodes share this machine's address
        "reading": {"dicom_header_processes": 0},
        "limits": {"max_volume_voxels": TEST_MAX_VOXELS, "request_deadline_s": DEADLINE_S},
        "deployments": {
            "ingress": {**on_cpu_node, "num_replicas": 2, "max_ongoing_requests": 64},
            "preprocess": {**on_cpu_node, "num_replicas": 2},
            "postprocess": {**on_cpu_node, "num_replicas": 2},
            "model": {"num_replicas": 2, "num_cpus": 0, "resources": {"model_slot": 1}},
        },
    }
    config_path = root / "faults.yaml"
    config_path.write_text(yaml.safe_dump(config))
    deploy(nodes, config_path)
    return FaultsApp(f"http://127.0.0.1:{config['http']['port']}", config_path, root / "models" / MODEL / "model.yaml")


@pytest.fixture(scope="module")
def study(phantom) -> bytes:
    return nib.Nifti1Image(phantom.volume.array, phantom.volume.affine).to_bytes()


def test_replicas_land_on_the_nodes_their_resources_name(nodes, faults_app):
    placed = nodes.replicas()
    print(json.dumps(placed, indent=1))
    assert placed["head"] == [], "the head (num-cpus 0) holds no replica"
    for deployment in ("Ingress", "Preprocess", "Postprocess"):
        assert placed["cpu"].count(replica_title(APP, deployment)) == 2, placed
    model = replica_title(APP, f"ModelReplica:{MODEL}")
    assert model not in placed["cpu"], "a model replica on the node without model slots"
    # Serve spreads a deployment's replicas over the nodes that can take them.
    assert placed["gpu-a"] == [model] and placed["gpu-b"] == [model], placed


def _kill_one_replica(deployment: str) -> None:
    title = replica_title(APP, deployment)
    for process in psutil.process_iter(["cmdline"]):
        if " ".join(process.info["cmdline"] or []).startswith(title):
            process.send_signal(signal.SIGKILL)
            return
    raise AssertionError(f"no {title} process to kill")


def _restart_gcs_after_an_outage(nodes: RayNodes) -> None:
    nodes.kill_gcs()
    time.sleep(10)  # ten seconds without a GCS, traffic flowing
    nodes.restart_gcs()


def _roll_out_a_new_version(nodes: RayNodes, app: FaultsApp) -> None:
    spec = yaml.safe_load(app.model_yaml.read_text())
    app.model_yaml.write_text(yaml.safe_dump({**spec, "version": "1.1.0"}))
    deploy(nodes, app.config_path)


FAULTS = {
    "model replica killed": lambda nodes, app: _kill_one_replica(f"ModelReplica:{MODEL}"),
    "GPU node stopped": lambda nodes, app: nodes.stop_node("gpu-b"),
    "ingress replica killed": lambda nodes, app: _kill_one_replica("Ingress"),
    "GCS killed and restarted": lambda nodes, app: _restart_gcs_after_an_outage(nodes),
    "rolling update": _roll_out_a_new_version,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_under_load_loses_nothing(nodes, faults_app, study, fault):
    report = run_load(
        f"{faults_app.url}{SEGMENT}",
        study,
        fault_name=fault,
        fault=lambda: FAULTS[fault](nodes, faults_app),
        clients=CLIENTS,
        duration_s=LOAD_S,
        fault_at_s=FAULT_AT_S,
        timeout_s=DEADLINE_S + 30,
    )
    SUMMARY.setdefault(FAULTS_HEADING, []).append(report.line())
    assert report.failed == [] and report.hung == 0, report.line() + f"\n{report.failed[:5]}"
    assert report.completed == report.sent > CLIENTS, report.line()
    # A request in flight at the fault is retried once, after its dropped connection; none is retried twice, and
    # no request sent after the fault is retried at all.
    assert report.retries <= report.in_flight_at_fault, report.line()
    with httpx.Client(base_url=faults_app.url, timeout=60) as client:
        unreadable = [r for r in report.result_ids if client.get(f"/v1/results/{r}").status_code != 200]
    assert unreadable == [], f"{len(unreadable)} answered results cannot be read"
    _wait_for_full_strength(nodes)
    if fault == "rolling update":
        models = httpx.get(f"{faults_app.url}/v1/models", timeout=60).json()
        assert [m["version"] for m in models["models"] if m["name"] == MODEL] == ["1.1.0"], models


_SERVE_STATUS = """
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
app = serve.status().applications[sys.argv[2]]
print(json.dumps({name: {"status": str(d.status), "running": d.replica_states.get("RUNNING", 0)}
                  for name, d in app.deployments.items()}))
"""


def _wait_for_full_strength(nodes: RayNodes) -> None:
    """Until every deployment is healthy with all its replicas running, as Serve's controller reports it (asked
    from a child process: this one may be connected to the session's own cluster)."""
    deadline = time.monotonic() + FULL_STRENGTH_WAIT_S
    seen = None
    while time.monotonic() < deadline:
        asked = subprocess.run(
            [sys.executable, "-c", _SERVE_STATUS, nodes.address, APP],
            capture_output=True, text=True, timeout=60, env=nodes.client_environment,
        )  # fmt: skip
        if asked.returncode == 0:
            seen = json.loads(asked.stdout.strip().splitlines()[-1])
            if all(
                seen[name]["running"] == count and seen[name]["status"].endswith("HEALTHY")
                for name, count in REPLICAS.items()
            ):
                return
        time.sleep(2)
    raise AssertionError(f"not back to full strength in {FULL_STRENGTH_WAIT_S} s: {seen}")


def test_down_drains_requests_in_flight_and_refuses_new_ones(nodes, faults_app, study):
    """``medserve down``: requests in flight when it starts are answered (200), new ones get 503 "shutting down"
    with Retry-After, then the application is gone. Last in this module: it takes the app down."""
    # (sent, answered, status, reason, Retry-After), monotonic seconds; a request that raised is recorded with the
    # exception's name as its status, so that it cannot pass for an answer. Asserted in this thread, not the clients'.
    answers: list[tuple[float, float, int | str, str, str | None]] = []
    refused = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=DEADLINE_S + 30) as http:
            while not refused.is_set():
                sent = time.monotonic()
                try:
                    answer = http.post(f"{faults_app.url}{SEGMENT}", content=study)
                except httpx.HTTPError as e:
                    answers.append((sent, time.monotonic(), type(e).__name__, str(e)[:200], None))
                    refused.set()
                    return
                reason = answer.json().get("error", {}).get("reason", "") if answer.status_code != 200 else ""
                answers.append((sent, time.monotonic(), answer.status_code, reason, answer.headers.get("retry-after")))
                if answer.status_code == 503:
                    refused.set()  # a client told the server is going away stops sending (to it)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(FAULT_AT_S)
    ordered = time.monotonic()
    down = medserve(
        "down", "--address", nodes.address, "--config", str(faults_app.config_path), "--keep-ray", "--grace-s", "60",
        env=nodes.client_environment,
    )  # fmt: skip
    for thread in threads:
        thread.join()
    statuses = Counter(status for _, _, status, _, _ in answers)
    in_flight = [a for a in answers if a[0] < ordered < a[1]]
    SUMMARY.setdefault(FAULTS_HEADING, []).append(
        f"medserve down under load: answers {dict(statuses)}; {len(in_flight)} in flight when it began, all answered"
    )
    assert down.returncode == 0, down.stdout + down.stderr[-3000:]
    assert set(statuses) <= {200, 503} and statuses[503] >= 1, answers
    assert in_flight and all(status == 200 for _, _, status, _, _ in in_flight), in_flight
    refusals = [(reason, retry_after) for _, _, status, reason, retry_after in answers if status == 503]
    assert all("shutting down" in reason for reason, _ in refusals), refusals
    assert all(retry_after == str(SHUTDOWN_RETRY_S) for _, retry_after in refusals), refusals
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{faults_app.url}/readyz", timeout=10).raise_for_status()
