"""What tests share that is not a fixture: the segment route, archive builders, Dice, mask download.

Fixtures live in ``conftest.py``; everything a test imports by name lives here.
"""

from __future__ import annotations

import gzip
import http.client
import io
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import nibabel as nib
import numpy as np

if TYPE_CHECKING:
    from serve_app.config import AppConfig

MODEL = "ct-phantom-organ"
SEGMENT = f"/v1/models/{MODEL}/segment"
ZIP = {"content-type": "application/zip"}
# Small enough that a test can exceed it without a large upload.
TEST_MAX_VOXELS = 128 * 128 * 100
# Small enough that a test can send a zip bomb over it in seconds (the largest real test study is ~4 MB).
TEST_MAX_UPLOAD_BYTES = 48 * 1024**2
TEST_MAX_FILES = 2_000


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before in this run: the system may offer a port again as soon as
    it is closed, and a Ray node given the same port for two of its components does not start."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def auth(key: str) -> dict:
    """The headers that send a tenant's API key."""
    return {"authorization": f"Bearer {key}"}


def stall_uploads(tenant_url: str, key: str, count: int) -> list[http.client.HTTPConnection]:
    """Uploads that stop half way: each holds one of the tenant's concurrent requests open (at the gate)."""
    url = urlsplit(tenant_url)
    stalled = []
    for _ in range(count):
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        connection.putrequest("POST", url.path + SEGMENT)
        for name, value in {**ZIP, **auth(key), "content-length": "40000"}.items():
            connection.putheader(name, value)
        connection.endheaders()
        connection.send(b"PK\x03\x04" + b"x" * 100)
        stalled.append(connection)
    return stalled


def audit_lines(config) -> list[dict]:
    """Every audit line the application of ``config`` wrote (its default audit folder), oldest file first."""
    import json

    folder = config.storage.root / "audit"
    return [json.loads(line) for path in sorted(folder.glob("audit-*.log*")) for line in path.read_text().splitlines()]


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def zip_files(paths: list[Path]) -> bytes:
    return zip_bytes({p.name: p.read_bytes() for p in paths})


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def load_mask(client: httpx.Client, result: dict) -> nib.Nifti1Image:
    """The mask of a segment answer, downloaded from its ``mask_url``."""
    response = client.get(result["mask_url"])
    assert response.status_code == 200, response.text
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


def medserve(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """The ``medserve`` command, as a user runs it. What ``medserve up`` records (serve_app/cli/up_record.py) goes
    to this test run's own state folder, never the user's, unless the test's ``env`` names one (XDG_STATE_HOME)."""
    import os

    if env is None:
        env = {**os.environ, "XDG_STATE_HOME": _TEST_STATE_HOME}
    env = {"XDG_STATE_HOME": _TEST_STATE_HOME, **env}
    return subprocess.run(
        [sys.executable, "-m", "serve_app.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


_TEST_STATE_HOME = tempfile.mkdtemp(prefix="medserve-test-state-")


def properties_without_description(schema: dict) -> list[str]:
    """Dotted names of the properties of a JSON schema, and of its $defs, that have no description."""
    missing = []
    for model_name, model in {schema["title"]: schema, **schema.get("$defs", {})}.items():
        for field, prop in model.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{model_name}.{field}")
    return missing


def skip_unless_installed(what: str, reason: str) -> None:
    """Skip a test for want of a tool here; in CI (``CI=true``), where ``.ci/run`` installs it, fail instead.

    Only the want of a GPU or TensorRT may skip a test in CI: those skip with ``pytest.skip`` directly.
    """
    import os

    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is missing in CI, where .ci/run installs it: {reason}")
    pytest.skip(reason)


def assert_no_markers_in_logs(markers: list[str], more_logs: list[Path] = ()) -> None:
    """None of ``markers`` (patient names, IDs, UIDs) is in any log of the test cluster's session, nor in
    ``more_logs``."""
    import ray

    time.sleep(2)  # let the log monitor and file handlers flush
    session_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    scanned = 0
    for path in [*session_logs.rglob("*"), *more_logs]:
        if path.is_file():
            text = path.read_text(errors="replace")
            scanned += 1
            leaked = [m for m in markers if m in text]
            assert not leaked, f"{leaked} in {path}"
    assert scanned > 10


def exported_samples(name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of ``name`` (their labels and values) as the node's metrics agent exports them now. Only ``name``'s
    own lines are parsed, not the thousands of every other series the agent exports."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray.nodes()[0]["MetricsExportPort"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    lines = "\n".join(line for line in text.splitlines() if line.startswith((f"{name}{{", f"{name} ")))
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(lines)
        for sample in family.samples
        if sample.name == name
    ]


def exported_total(name: str, **labels: str) -> float:
    """The samples of ``name`` with these label values, summed, as the node's metrics agent exports them now."""
    return sum(value for tags, value in exported_samples(name) if all(tags.get(k) == v for k, v in labels.items()))


def requests_counted(code: int) -> float:
    """``ray_medserve_requests_total`` with this code, summed, as the node's metrics agent exports it now."""
    return exported_total("ray_medserve_requests_total", code=str(code))


def requests_counted_by_code(*codes: int) -> list[float]:
    """``requests_counted`` of each code, from one scrape."""
    samples = exported_samples("ray_medserve_requests_total")
    return [sum(value for tags, value in samples if tags.get("code") == str(code)) for code in codes]


def settled(read, timeout_s: float = 60):
    """``read()`` once it is unchanged over more than one of Ray's export intervals (the test cluster exports metrics
    every 2 s). A count read while an earlier request's is still on its way would make the next one look one too
    many."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while time.monotonic() < deadline:
        time.sleep(2.5)
        value, previous = read(), value
        if value == previous:
            break
    return value


def settled_counts(*codes: int, timeout_s: float = 60) -> list[float]:
    """``requests_counted`` of each code, ``settled``."""
    return settled(lambda: [requests_counted(code) for code in codes], timeout_s)


def wait_until_counted(code: int, count: float, timeout_s: float = 60) -> float:
    """Wait until ``requests_counted(code)`` reaches ``count`` (Ray exports metrics every few seconds); return it."""
    deadline = time.monotonic() + timeout_s
    while (counted := requests_counted(code)) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return counted


# Every test cluster's: an ingress replica being removed stops taking requests after 2 s, not Serve's 30 s, which it
# waits so that an external load balancer deregisters it. Here the one load balancer is HAProxy on the same machine,
# which Serve reconfigures at once; each app a test deletes would otherwise cost half a minute.
# (How often replicas report their backlog to Serve's controller is each autoscaled deployment's own
# ``autoscaling.metrics_interval_s``: Ray 2.60 reads no environment variable for it.)
TEST_RAY_ENVIRONMENT = {
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


# WSI jobs on the test cluster: small work units (tiny slides still have several), the tile model scaled
# from 0 to 2 replicas within seconds (Serve's defaults wait 30 s and 10 min) on a sliver of a CPU each.
TEST_WSI = {
    "wsi.chunk_tiles": 4,
    "wsi.chunks_in_flight": 8,
    "deployments.tile_model": {
        "num_cpus": 0.1,
        "max_ongoing_requests": 2,
        "autoscaling": {
            "min_replicas": 0,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 5,
            # Serve averages the backlog over this window (30 s by default): the drained job's replicas go 5 s after
            # its last tile, not half a minute.
            "look_back_period_s": 2,
            # Replicas and handles report the backlog every second (Serve's default, every 10 s, would leave the
            # controller acting on figures up to 10 s old: the tile model would scale up and down that much later).
            "metrics_interval_s": 1,
        },
    },
}


# A MONAI bundle's two config files, relative to its folder.
INFERENCE, METADATA = "configs/inference.json", "configs/metadata.json"


def write_organ_bundle(folder: Path, config_format: str = "json", weights: str = "pt", version: str = "1.0.0") -> Path:
    """The embedded model written as a MONAI bundle in ``folder`` (MONAI's writers), with ``version`` in its
    metadata; ``weights``: pt (state dict), ts (TorchScript) or both."""
    from serve_app.config import EMBEDDED_MODEL_REPOSITORY
    from serve_app.model_repository import ModelRepository
    from serve_app.samples.bundles import write_bundle

    embedded = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get(MODEL)
    return write_bundle(embedded.model_copy(update={"version": version}), folder, config_format, weights)


def edit_json(path: Path, change) -> None:
    """Apply ``change`` (a function that edits a dict in place) to a JSON file."""
    import json

    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def insert_transform(transform: dict, at: int = 3):
    """A change for ``edit_json``: ``transform`` inserted into a bundle's preprocessing at ``at``."""
    return lambda config: config["preprocessing"]["transforms"].insert(at, transform)


def beside_the_main_app(app_config: AppConfig, **update) -> AppConfig:
    """``app_config`` changed by ``update``, for an app a test deploys beside the main one: without the main app's DICOM
    node, its routes and destinations, which no such app is deployed to test (the node's replica would only cost
    each deployment seconds of CI's two cores)."""
    return app_config.model_copy(update={"dicom_network": None, "routes": {}, "destinations": {}, **update})


def make_room_for_an_app(main_app: str) -> None:
    """Delete every Serve app but ``main_app``: the test cluster has room for the main app and one more, and an app
    an earlier test left running (the tenant app, which ``tenant_url`` deploys again when next asked for) would
    leave the next one's replicas waiting for CPUs, whatever order the tests run in."""
    from ray import serve

    for name in serve.status().applications:
        if name != main_app:
            serve.delete(name)


WSI_JOBS = "/v1/wsi/jobs"


def wait_for_job(client: httpx.Client, job_id: str, timeout_s: float = 300) -> dict:
    """A WSI job's record once it has ended (neither queued nor running); AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"{WSI_JOBS}/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout_s} s: {job}")


def node_port(application: str) -> int:
    """The port the application's DICOM node listens on (the test configs say 0: any free one)."""
    from ray import serve

    return serve.get_deployment_handle("DicomNode", application).port.remote().result(timeout_s=60)


def storescu(port: int, paths: list[Path], calling: str = "STORESCU", called: str = "MEDSERVE"):
    """dcmtk's storescu sending ``paths`` to the DICOM node at ``port`` on this machine."""
    return subprocess.run(
        ["storescu", "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
