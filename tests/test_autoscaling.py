"""Autoscaling watched acting: under a burst of requests Serve adds model replicas (up to 3; preprocessing's too
when its own queue grows) and takes them away once the queue has drained, with no request failing either way. A
real Serve app beside the main one (replica counts from Serve's controller, once a second), real HTTP."""

import threading
import time

import nibabel as nib
import pytest
from fault_load import SUMMARY, run_load
from ray import serve

from helpers import SEGMENT, beside_the_main_app, make_room_for_an_app
from serve_app.app import build_app
from serve_app.config import AutoscalingConfig

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

PREFIX = "/elastic"
MODEL_DEPLOYMENT = "ModelReplica:ct-phantom-organ"
ELASTIC = ("Preprocess", MODEL_DEPLOYMENT)
# Quick to act, so the test takes a minute or two: Serve's defaults wait 30 s to add a replica and 10 min to
# remove one.
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 3,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 2,
    "downscale_delay_s": 5,
    "look_back_period_s": 2,
    "metrics_interval_s": 1,  # the backlog reported every second, not every 10 s (Serve's default)
}
# The burst lasts until the model's deployment has scaled up, or this long.
MAX_BURST_S = 150
DRAIN_WAIT_S = 120


@pytest.fixture
def elastic_url(server_url, app_config):
    """Preprocessing and the model autoscaled between 1 and 3 replicas (no CPUs reserved: the test cluster's
    CPUs are the main app's)."""
    elastic = {"num_cpus": 0, "autoscaling": AutoscalingConfig(**AUTOSCALING)}
    deployments = app_config.deployments.model_copy(
        update={
            name: getattr(app_config.deployments, name).model_copy(update=elastic) for name in ("preprocess", "model")
        }
    )
    config = beside_the_main_app(app_config, name="medserve-elastic", layout="split", deployments=deployments)
    make_room_for_an_app(app_config.name)
    serve.run(build_app(config), name=config.name, route_prefix=PREFIX, blocking=False)
    yield server_url + PREFIX, config.name
    serve.delete(config.name)


def _running_replicas(app: str) -> dict[str, int]:
    deployments = serve.status().applications[app].deployments
    return {name: deployments[name].replica_states.get("RUNNING", 0) for name in ELASTIC if name in deployments}


def test_serve_adds_replicas_under_a_burst_and_removes_them_after(elastic_url, phantom):
    url, app = elastic_url
    counts: list[tuple[float, dict[str, int]]] = []
    burst_over, watching = threading.Event(), threading.Event()
    started = time.monotonic()

    def watch() -> None:
        while not watching.is_set():
            seen = _running_replicas(app)
            counts.append((round(time.monotonic() - started), seen))
            if seen.get(MODEL_DEPLOYMENT, 0) > 1:
                burst_over.set()  # the model, where the queue builds, scaled up: the burst has shown it
            time.sleep(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        study = nib.Nifti1Image(phantom.volume.array, phantom.volume.affine).to_bytes()
        report = run_load(
            f"{url}{SEGMENT}", study, fault_name="burst", clients=8, duration_s=MAX_BURST_S, stop=burst_over
        )
        burst_end = time.monotonic() - started
        deadline = time.monotonic() + DRAIN_WAIT_S
        while time.monotonic() < deadline and any(n != 1 for n in counts[-1][1].values()):
            time.sleep(1)
    finally:
        watching.set()
        watcher.join()
    timeline = [f"{t:4d} s  " + "  ".join(f"{name} {n}" for name, n in seen.items()) for t, seen in counts]
    changes = [line for i, line in enumerate(timeline) if i == 0 or line[6:] != timeline[i - 1][6:]]
    SUMMARY["autoscaling: replicas running, seconds from the burst's start (8 clients)"] = [
        *changes,
        f"the burst ended at {burst_end:.0f} s",
        report.line(),
    ]
    assert report.failed == [] and report.hung == 0 and report.completed == report.sent, report.line()
    during = [seen[MODEL_DEPLOYMENT] for t, seen in counts if t <= burst_end]
    assert max(during) > 1, f"the model never scaled up during the burst: {timeline}"
    for name in ELASTIC:  # preprocessing scales too when its own queue grows; both must come back down
        assert counts[-1][1][name] == 1, f"{name} did not scale back down to 1 after the burst: {timeline[-5:]}"
