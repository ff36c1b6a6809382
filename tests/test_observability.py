"""Observability, proven against a real Prometheus scraping the test cluster under traffic.

Prometheus (Debian's package; `.ci/run` installs it) finds the Ray cluster through the
service-discovery file Ray's dashboard writes, and scrapes the GPU exporter; every PromQL
expression of every Grafana panel must then return data (the Rollouts dashboard's from a shadow
rollout in a small application of this module's own).
"""

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import ray
import yaml
from fastapi import FastAPI, HTTPException, Request
from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    MODEL,
    SEGMENT,
    ZIP,
    auth,
    exported_total,
    free_port,
    node_port,
    settled,
    skip_unless_installed,
    storescu,
    zip_bytes,
)
from serve_app.app import build_app
from serve_app.cli.cluster import wait_until_ready
from serve_app.config import load_config
from serve_app.observability import gpu_exporter, monitoring
from serve_app.observability.metrics import STAGES, ResponseCounter
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.synthetic_slides import write_slide

DASHBOARD_FILES = sorted((monitoring.DASHBOARDS / "grafana" / "dashboards").glob("*.json"))
ALERT_RULES = monitoring.DASHBOARDS / "alerts" / "medserve.rules.yml"
RATE_INTERVAL = "5m"  # what Grafana's $__rate_interval stands for in these queries
# A zip entry name and a result id as a hospital might send them: they must never reach a label.
PATIENT_MARKER = "DOE_JOHN_1970"
ROLLOUT_APP, ROLLOUT_PREFIX, ROLLOUT_MODEL = "medserve-rollout-panels", "/rollout-panels", "organ"
EMBEDDED_MODEL = Path(__file__).parent.parent / "serve_app" / "models" / MODEL


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, PromQL) for every target of every panel of every dashboard."""
    queries = []
    for path in DASHBOARD_FILES:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
                queries.append((dashboard["title"], panel["title"], expr))
    return queries


class Prometheus:
    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log

    def query(self, expr: str) -> list[dict]:
        response = self._get("/api/v1/query", params={"query": expr})
        assert response["status"] == "success", f"{expr}: {response}"
        return response["data"]["result"]

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets")["data"]["activeTargets"]

    def alerting_rules(self) -> list[dict]:
        groups = self._get("/api/v1/rules", params={"type": "alert"})["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def _get(self, path: str, **kwargs) -> dict:
        response = httpx.get(f"{self.url}{path}", timeout=10, **kwargs)
        if response.status_code == 503:  # still loading: an HTTPError, which wait_for waits out
            response.raise_for_status()
        return response.json()

    def wait_for(self, what: str, ready, timeout_s: float = 90, describe=lambda: ""):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if result := ready():
                    return result
            except httpx.HTTPError:
                pass  # not listening yet, or 503 while it loads
            time.sleep(1)
        pytest.fail(
            f"Prometheus: {what} within {timeout_s:.0f} s {describe()}; its log ends:\n{self.log.read_text()[-1500:]}"
        )


def has_finite_value(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


@pytest.fixture(scope="module")
def prometheus(server_url, tmp_path_factory):
    if monitoring.find_binary("prometheus") is None:
        skip_unless_installed(
            "prometheus", "Prometheus is not installed here (apt-get install prometheus; .ci/run installs it)"
        )
    state = tmp_path_factory.mktemp("monitoring")
    gpu_port, port = free_port(), free_port()
    monitoring.start_gpu_exporter(gpu_port, state)
    # This test cluster's own discovery file: /tmp/ray/'s link follows whichever cluster started last.
    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    discovery_file = session_dir / monitoring.RAY_SERVICE_DISCOVERY_FILE.name
    # The alerting rules as shipped, but each `for:` 0 s: the live alert check would otherwise wait minutes.
    rules = yaml.safe_load(ALERT_RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    rules_now = state / "medserve.rules.for-0s.yml"
    rules_now.write_text(yaml.safe_dump(rules, sort_keys=False))
    config = monitoring.prometheus_config(discovery_file, gpu_port, "2s", rule_files=[rules_now])  # evaluated every 2 s
    monitoring.start_prometheus(config, port, state)
    try:
        api = Prometheus(f"http://127.0.0.1:{port}", state / "prometheus.log")
        node_port = str(ray.nodes()[0]["MetricsExportPort"])

        def node_and_gpu_targets_up():
            up = {
                (t["labels"]["job"], t["labels"]["instance"].rsplit(":", 1)[1])
                for t in api.targets()
                if t["health"] == "up"
            }
            return ("ray", node_port) in up and ("medserve-gpu", str(gpu_port)) in up

        api.wait_for("the Ray node's metrics agent and the GPU exporter scraped", node_and_gpu_targets_up)
        yield api
    finally:
        monitoring.stop(state)


@pytest.fixture(scope="module")
def rollout_url(server_url, app_config, tmp_path_factory):
    """A shadow rollout of the same network (candidate 1.1.0 beside live 1.0.0, every study shadowed) in an application
    of this module's own, fused layout: the series of the Rollouts dashboard. Deployed here and not waited for (the
    first round's other traffic runs meanwhile); it reserves no CPUs (its work is two small studies), so it takes no
    room from the tenant app."""
    from ray import serve

    root = tmp_path_factory.mktemp("rollout-panel-models")
    for version in ("1.0.0", "1.1.0"):
        folder = root / ROLLOUT_MODEL / version
        shutil.copytree(EMBEDDED_MODEL, folder)
        spec = (folder / "model.yaml").read_text().replace(f"name: {MODEL}", f"name: {ROLLOUT_MODEL}")
        (folder / "model.yaml").write_text(spec.replace('version: "1.0.0"', f'version: "{version}"'))
    config = load_config(
        overrides={
            "name": ROLLOUT_APP,
            "layout": "fused",
            "model_repository": str(root),
            "storage.root": str(tmp_path_factory.mktemp("rollout-panel-storage")),
            "http.port": app_config.http.port,
            "grpc": app_config.grpc.model_dump(),
            "deployments.ingress.num_cpus": 0,
            "models": {ROLLOUT_MODEL: {"num_cpus": 0, "batching": {"max_batch_size": 1}}},
            "pacs.main": {"url": "http://127.0.0.1:9/dicom-web"},
            "rollouts": {ROLLOUT_MODEL: {"candidate": "1.1.0", "live": "1.0.0", "mode": "shadow", "fraction": 1.0}},
        }
    )
    serve.run(build_app(config), name=ROLLOUT_APP, route_prefix=ROLLOUT_PREFIX, blocking=False)
    yield server_url + ROLLOUT_PREFIX
    serve.delete(ROLLOUT_APP, _blocking=False)  # it holds no CPUs: its replicas may stop while the next tests run


def small_study() -> bytes:
    """A small NIfTI phantom: a cheap study for the rollout app."""
    phantom = ct_phantom(np.random.default_rng(33), shape=(48, 48, 16))
    return nib.Nifti1Image(phantom.volume.array.astype(np.int16), phantom.volume.affine).to_bytes()


def run_rollout_study(rollout_url: str) -> None:
    """One study through the rollout app: answered by the live version, then shadowed by the candidate."""
    wait_until_ready(rollout_url, timeout_s=300)
    answer = httpx.post(
        f"{rollout_url}/v1/models/{ROLLOUT_MODEL}/segment",
        content=small_study(),
        headers={"content-type": "application/octet-stream"},
        timeout=300,
    )
    assert answer.status_code == 200 and answer.json()["model"]["version"] == "1.0.0", answer.text


def run_wsi_job(client: httpx.Client, slide: Path) -> None:
    """A real WSI job, to its end: the driver records the WSI metrics."""
    job = client.post("/v1/wsi/jobs", json={"model": "he-tile-tumour", "slides": [str(slide)]})
    assert job.status_code == 202, job.text
    deadline = time.monotonic() + 300
    while (status := client.get(f"/v1/wsi/jobs/{job.json()['job_id']}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status["state"] == "done" and status["tiles_done"] > 0, status


def send_traffic(
    server_url: str, study_zip: bytes, segments: int, slide: Path, dicom: tuple[int, list[Path]], rollout_url: str
) -> None:
    # The series C-STOREd to the application's DICOM node too: the DICOM panels' series (a re-send counts its
    # instances as duplicates).
    port, series = dicom
    sent = storescu(port, series)
    assert sent.returncode == 0, sent.stderr
    with httpx.Client(base_url=server_url, timeout=300) as client:

        def segment(_):
            response = client.post(SEGMENT, content=study_zip, headers=ZIP)
            assert response.status_code == 200, response.text
            # Each result accepted, as a radiologist would in the viewer: the acceptance-rate panel's series.
            review = {"verdict": "accept", "reviewer": "observability test"}
            reviewed = client.post(f"/v1/results/{response.json()['result_id']}/reviews", json=review)
            assert reviewed.status_code == 201, reviewed.text

        with ThreadPoolExecutor(segments) as pool:  # concurrent, so the model can batch them
            list(pool.map(segment, range(segments)))
        assert client.get("/v1/models/no-such-model").status_code == 404
        assert client.get(f"/v1/results/{PATIENT_MARKER}").status_code == 404
        assert client.post(SEGMENT, content=b"not a study").status_code == 415
        run_wsi_job(client, slide)
    run_rollout_study(rollout_url)


@pytest.fixture(scope="module")
def scraped(prometheus, rollout_url, server_url, app_config, phantom_series, slide_root):
    """Prometheus after two rounds of traffic: the first makes the series, the second moves their rates."""
    study_zip = zip_bytes({f"{PATIENT_MARKER}_{p.name}": p.read_bytes() for p in phantom_series})
    slide = write_slide(slide_root / "observability.tiff", 1500, 1100, seed=8).path
    dicom = (node_port(app_config.name), phantom_series)
    send_traffic(server_url, study_zip, 1, slide, dicom, rollout_url)
    first_round = [
        "ray_medserve_dicom_instances_total",
        "ray_medserve_request_duration_seconds_count",
        'ray_medserve_requests_total{code="415"}',
        "ray_medserve_batch_size_count",
        "ray_medserve_wsi_tiles_total",
        "ray_medserve_wsi_jobs_total",
        "ray_medserve_reviews_total",
        'ray_medserve_rollout_runs_total{role="live"}',
        "ray_medserve_rollout_agreement_dice_count",  # after the shadow run, which follows the live answer
    ]
    missing = first_round

    def first_round_scraped() -> bool:
        nonlocal missing
        missing = [q for q in first_round if not prometheus.query(q)]
        return not missing

    prometheus.wait_for("the first round's series", first_round_scraped, describe=lambda: f"(missing {missing})")
    send_traffic(server_url, study_zip, 3, slide, dicom, rollout_url)
    yield prometheus


def test_every_dashboard_query_returns_data(scraped):
    gpus = int(float(scraped.query("sum(medserve_gpu_count)")[0]["value"][1]))
    deadline = time.monotonic() + 120
    empty = []
    for dashboard, panel, expr in panel_queries():
        per_gpu = [name for name in gpu_exporter.PER_GPU_GAUGES if name in expr]
        if per_gpu and gpus == 0:
            # Without a GPU these series cannot exist; the query must still be valid and name the exporter's gauges.
            assert scraped.query(expr) == [], expr
            continue
        while not has_finite_value(result := scraped.query(expr)) and time.monotonic() < deadline:
            time.sleep(2)
        if not has_finite_value(result):
            empty.append(f"{dashboard} / {panel}: {expr} -> {result}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_stage_latencies_codes_batches_and_replicas_reach_prometheus(scraped):
    stages = {
        s["metric"]["stage"]
        for s in scraped.query(f'ray_medserve_request_duration_seconds_count{{model="{MODEL}",tenant="anonymous"}}')
    }
    assert stages == set(STAGES.values())
    codes = {
        s["metric"]["code"] for s in scraped.query('ray_medserve_requests_total{route="/v1/models/{name}/segment"}')
    }
    assert {"200", "415"} <= codes
    # Round one's request and round two's cannot share a batch; earlier tests on this cluster add more.
    scraped.wait_for(
        "two batches", lambda: scraped.query(f'sum(ray_medserve_batch_size_count{{model="{MODEL}"}}) >= 2')
    )
    replicas = {
        (s["metric"]["deployment"], s["metric"]["kind"]) for s in scraped.query("ray_medserve_replica_gpu_memory_bytes")
    }
    assert {
        ("Preprocess", "allocated"),
        (f"ModelReplica:{MODEL}", "allocated"),
        ("Postprocess", "reserved"),
    } <= replicas
    healthy = scraped.query('sum by (deployment) (ray_serve_deployment_replica_healthy{application="medserve"})')
    # The tile model is there while a WSI job runs (it scales to 0 between jobs).
    assert {s["metric"]["deployment"] for s in healthy} - {"TileModel:he-tile-tumour"} == {
        "DicomNode",
        "Ingress",
        "Preprocess",
        f"ModelReplica:{MODEL}",
        "Postprocess",
    }


def test_the_alert_rules_evaluate_and_one_fires_from_real_503s(scraped, tenant_url, tenant_keys):
    """The alerting rules loaded into this Prometheus all evaluate without error on the cluster's real series, and
    MedserveServiceUnavailable fires from real 503 answers: path-lab segmenting a series of a PACS on which nothing
    listens (``pacs.unanswered``). The `prometheus` fixture loads a copy of the rules with every `for:` set to 0 s and
    evaluates it every 2 s, so the alert fires as soon as its expression holds (the shipped `for:` of minutes is
    promtool's to test: tests/test_alert_rules.py). The replica-start series the restart alerts count are checked
    to exist under the name the rules use."""
    rules = scraped.alerting_rules()
    assert len(rules) == len(
        [r for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in group["rules"] if "alert" in r]
    )
    route = "/v1/models/{name}/versions/{version}/segment"  # a route no other test refuses with 503
    version = httpx.get(f"{tenant_url}/v1/models/{MODEL}", headers=auth(tenant_keys["path-lab"]), timeout=60)
    url = f"{tenant_url}/v1/models/{MODEL}/versions/{version.json()['version']}/segment"
    order = {"pacs": "unanswered", "study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4"}
    deadline = time.monotonic() + 8  # spread over several scrapes, so that the counter's rise is seen
    while time.monotonic() < deadline:
        refused = httpx.post(url, json=order, headers=auth(tenant_keys["path-lab"]), timeout=60)
        assert refused.status_code == 503 and "unanswered" in refused.json()["error"]["reason"], refused.text
        time.sleep(0.25)

    def firing() -> bool:
        return any(
            alert["labels"].get("route") == route and alert["state"] == "firing"
            for rule in scraped.alerting_rules()
            if rule["name"] == "MedserveServiceUnavailable"
            for alert in rule["alerts"]
        )

    scraped.wait_for("MedserveServiceUnavailable firing", firing, timeout_s=60)
    unhealthy = [(r["name"], r.get("lastError")) for r in scraped.alerting_rules() if r["health"] != "ok"]
    assert not unhealthy, unhealthy
    starts = scraped.query('ray_serve_deployment_replica_starts_total{deployment="Ingress"}')
    assert starts and all("replica" in s["metric"] and "application" in s["metric"] for s in starts), starts


def test_no_label_value_carries_what_a_hospital_sent(scraped):
    for series in scraped.query('{__name__=~"ray_medserve_.+"}'):
        assert not any(PATIENT_MARKER in value for value in series["metric"].values()), series["metric"]


def test_the_live_response_counter_counts_refusals_by_route_template_and_tenant(tenant_url, tenant_keys):
    """On the live tenant app: a tenancy refusal and a route that does not exist are counted as they were answered,
    by route template (never the raw path, which may carry what was sent), status and tenant."""
    refused = {"route": "/v1/models/{name}/segment", "method": "POST", "code": "403", "tenant": "research-lab"}
    unmatched = {"route": "unmatched", "method": "GET", "code": "404", "tenant": "anonymous"}

    def counts() -> list[float]:
        return [exported_total("ray_medserve_requests_total", **labels) for labels in (refused, unmatched)]

    before = settled(counts)
    forbidden = httpx.post(f"{tenant_url}{SEGMENT}", content=b"", headers={**ZIP, **auth(tenant_keys["research-lab"])})
    missing = httpx.get(f"{tenant_url}/v1/{PATIENT_MARKER}")
    assert (forbidden.status_code, missing.status_code) == (403, 404)
    assert settled(counts) == [before[0] + 1, before[1] + 1]


def test_response_counter_counts_an_unhandled_error_as_a_500_in_process():
    """In process, on a plain FastAPI app (no Ray): what the live server cannot be made to do on purpose, a bug
    raising an unhandled exception, is counted as a 500; the other codes as the live test above counts them."""
    recorded = []
    api = FastAPI()
    api.add_middleware(ResponseCounter, record=lambda *row: recorded.append(row))

    @api.get("/v1/results/{result_id}")
    async def limited(result_id: str, request: Request):
        request.state.tenant_id = "clinic-a"
        raise HTTPException(status_code=429)

    @api.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    async def get(*paths):
        transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://medserve") as client:
            return [(await client.get(path)).status_code for path in paths]

    assert asyncio.run(get(f"/v1/results/{PATIENT_MARKER}", "/boom", "/nowhere")) == [429, 500, 404]
    assert recorded == [
        ("/v1/results/{result_id}", "GET", 429, "clinic-a"),
        ("/boom", "GET", 500, "anonymous"),
        ("unmatched", "GET", 404, "anonymous"),
    ]


def scrape_gpu_exporter(tmp_path) -> dict:
    port = free_port()
    monitoring.start_gpu_exporter(port, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        monitoring.stop(tmp_path)
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_gpu_exporter_without_gpu_reports_zero(tmp_path):
    if gpu_exporter.snapshot()["gpu_count"]:
        pytest.skip("this machine has an NVIDIA GPU")
    families = scrape_gpu_exporter(tmp_path)
    assert [s.value for s in families["medserve_gpu_count"]] == [0]
    for name in gpu_exporter.PER_GPU_GAUGES:
        assert families[name] == []


def test_gpu_exporter_reports_every_gpu(tmp_path):
    reading = gpu_exporter.snapshot()
    if not reading["gpu_count"]:
        pytest.skip(f"no NVIDIA GPU on this machine (NVML: {reading['nvml_error']})")
    families = scrape_gpu_exporter(tmp_path)
    assert [s.value for s in families["medserve_gpu_count"]] == [reading["gpu_count"]]
    for name in gpu_exporter.PER_GPU_GAUGES:
        assert sorted(s.labels["gpu"] for s in families[name]) == [str(i) for i in range(reading["gpu_count"])], name
    assert all(s.value > 0 for s in families["medserve_gpu_memory_total_bytes"])


def test_dashboards_fit_grafanas_schema():
    """Grafana itself cannot be installed here; grafana-foundation-sdk (Grafana Labs' models generated from
    Grafana's schemas) parses each dashboard, panel options included, and re-encodes it: a key the schema
    does not know is dropped, and any such key fails this test."""
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()
    datasource_uid = re.search(
        r"uid: (\S+)", (monitoring.DASHBOARDS / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )[1]
    assert {p.stem for p in DASHBOARD_FILES} == {"overview", "gpu", "tenants", "wsi", "inputs", "rollouts"}
    for path in DASHBOARD_FILES:
        ours = json.loads(path.read_text())
        theirs = json.loads(json.dumps(Dashboard.from_json(ours), cls=JSONEncoder))
        assert unknown_keys(ours, theirs) == [], path.name
        assert len({p["id"] for p in ours["panels"]}) == len(ours["panels"]), path.name
        for panel in ours["panels"]:
            assert panel["datasource"]["uid"] == datasource_uid, (path.name, panel["title"])
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), (path.name, panel["title"])


def unknown_keys(ours, theirs, where: str = "") -> list[str]:
    """Paths in ``ours`` that are missing or different in ``theirs``."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [
            p
            for k, v in ours.items()
            for p in (unknown_keys(v, theirs[k], f"{where}.{k}") if k in theirs else [f"{where}.{k}"])
        ]
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        pairs = enumerate(zip(ours, theirs, strict=True))
        return [p for i, (a, b) in pairs for p in unknown_keys(a, b, f"{where}[{i}]")]
    return [] if ours == theirs else [f"{where}: {ours!r} became {theirs!r}"]


def test_prometheus_config_is_valid(tmp_path):
    promtool = monitoring.find_binary("promtool")
    if promtool is None:
        skip_unless_installed("promtool", "promtool (Debian's prometheus package) is not installed here")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(monitoring.prometheus_config()))
    for path in (monitoring.DASHBOARDS / "prometheus.yml", config):
        result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_docs_document_every_metric():
    docs = "\n".join(page.read_text() for page in (Path(__file__).parent.parent / "docs").glob("*.md"))
    source = (Path(__file__).parent.parent / "serve_app" / "observability" / "metrics.py").read_text()
    names = re.findall(r'\(\s*"(medserve_\w+)"', source) + ["medserve_gpu_count", *gpu_exporter.PER_GPU_GAUGES]
    assert len(names) >= 12
    missing = [n for n in names if n not in docs]
    assert not missing, f"the docs do not document {missing}"


def test_monitoring_start_serves_prometheus_and_the_gpu_exporter_until_stopped(tmp_path):
    """What `medserve up --monitoring` starts and `medserve down` stops, on free ports."""
    if monitoring.find_binary("prometheus") is None:
        skip_unless_installed(
            "prometheus", "Prometheus is not installed here (apt-get install prometheus; .ci/run installs it)"
        )
    ports = monitoring.Ports(prometheus=free_port(), gpu_exporter=free_port(), grafana=free_port())
    urls = monitoring.start(ports, tmp_path)
    try:
        api = Prometheus(urls["prometheus"], tmp_path / "prometheus.log")
        api.wait_for("the GPU exporter scraped", lambda: api.query('up{job="medserve-gpu"} == 1'), timeout_s=60)
    finally:
        stopped = monitoring.stop(tmp_path)
    assert sorted(stopped) == sorted(name for name in ("gpu-exporter", "prometheus", "grafana") if name in urls)
    with pytest.raises(httpx.ConnectError):
        httpx.get(urls["prometheus"], timeout=5)
