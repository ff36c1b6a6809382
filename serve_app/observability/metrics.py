"""Every custom metric medserve exports through Ray's metrics pipeline, in one place.

Ray's metrics agent prefixes custom metrics with ``ray_`` and exports a Counter as ``<name>_total``:
``medserve_requests`` below is ``ray_medserve_requests_total`` in Prometheus. README.md
("Metrics and dashboards") lists every name, type and label; the dashboards in ``dashboards/``
query them. The GPU exporter (``serve_app/observability/gpu_exporter.py``) is a separate process with its own names.

Label values never come from what a hospital sends: models are the repository's names (only for
known models), routes are templates (``/v1/results/{result_id}``), tenants are the ids the tenancy
layer assigns.

Ray rebuilds a histogram's ``_sum`` from bucket midpoints (a batch of 1 adds 0.5): use its buckets
and ``_count``, which are exact, not ``_sum``.

Metric objects are made lazily, inside the replica that records them: ``ray.serve.metrics`` reads
the replica context (deployment, replica) when a metric is created.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable, Mapping

from serve_app.errors import status_of

# Ingress timings (``timings_ms`` keys) -> the ``stage`` label.
STAGES = {
    "upload": "ingress",
    "model_queue": "queue_wait",
    "preprocess": "preprocess",
    "model": "model",
    "postprocess": "postprocess",
    "total": "total",
}
# Seconds: a cached tiny study takes milliseconds a stage, a 2000-slice CT on CPU minutes.
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
# Every size up to 4 its own bucket, so ceil(histogram_quantile(...)) is exact there.
BATCH_SIZE_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
GPU_MEMORY_REPORT_INTERVAL_S = 5.0
ANONYMOUS = "anonymous"


@functools.cache
def _request_metrics():
    from ray.util import metrics

    # Plain Ray metrics, not ray.serve.metrics: a replica label would multiply every request series.
    requests = metrics.Counter(
        "medserve_requests",
        description="HTTP responses of the medserve API, by route template, method, status code and tenant.",
        tag_keys=("route", "method", "code", "tenant"),
    )
    latency = metrics.Histogram(
        "medserve_request_duration_seconds",
        description="Seconds a successful segment request spent in each stage, per model, tenant and route (the HTTP "
        "route's template, or dicom: a series routed by the DICOM node).",
        boundaries=LATENCY_BUCKETS_S,
        tag_keys=("stage", "model", "tenant", "route"),
    )
    return requests, latency


def record_response(route: str, method: str, code: int, tenant: str) -> None:
    _request_metrics()[0].inc(tags={"route": route, "method": method, "code": str(code), "tenant": tenant})


def observe_segment(request, model: str, timings_ms: Mapping[str, float]) -> None:
    """Called by the ingress once a segment request succeeded, with the timings it returns (stage -> ms)."""
    route = getattr(request.scope.get("route"), "path", "unmatched")  # a template, never the raw path
    observe_stages(route, model, tenant_of(request.scope), timings_ms)


def observe_stages(route: str, model: str, tenant: str, timings_ms: Mapping[str, float]) -> None:
    """A successful segmentation's seconds in each stage; ``route``: an HTTP route's template, or ``dicom`` for a
    series the DICOM node routed."""
    latency = _request_metrics()[1]
    for key, stage in STAGES.items():
        tags = {"stage": stage, "model": model, "tenant": tenant, "route": route}
        latency.observe(timings_ms[key] / 1000.0, tags=tags)


def tenant_of(scope: dict) -> str:
    # The tenancy layer sets ``request.state.tenant_id``; Starlette keeps request.state in scope["state"].
    return str(scope.get("state", {}).get("tenant_id", ANONYMOUS))


@functools.cache
def _review_counter():
    from ray.util import metrics

    return metrics.Counter(
        "medserve_reviews",
        description="Reviews of results stored, by the result's model and version, verdict and tenant.",
        tag_keys=("model", "version", "verdict", "tenant"),
    )


def count_review(model: str | None, version: str | None, verdict: str, tenant: str) -> None:
    """Called by the ingress once a review is stored. ``model`` and ``version`` are the result's own record of the
    model that made it (``unknown`` for a result stored without one), never a string the client sent."""
    tags = {"model": model or "unknown", "version": version or "unknown", "verdict": verdict, "tenant": tenant}
    _review_counter().inc(tags=tags)


@functools.cache
def _audit_failure_counter():
    from ray.util import metrics

    return metrics.Counter(
        "medserve_audit_write_failures",
        description="Audit lines that could not be written, by sink (file: the replica's audit file; stdout).",
        tag_keys=("sink",),
    )


def count_audit_write_failure(sink: str) -> None:
    """Called by the audit log when a line could not be written to ``sink`` (``file`` or ``stdout``)."""
    _audit_failure_counter().inc(tags={"sink": sink})


class ResponseCounter:
    """ASGI middleware: counts every response, including the 4xx an exception handler answers.

    ``record(route, method, code, tenant)`` is called once per HTTP request, after it ended.
    A request that raised past every handler is counted with ``errors.status_of``: 499 for a client
    that hung up (its request is cancelled, and nothing is answered), else the 500 the server answers.
    """

    def __init__(self, app, record: Callable[[str, str, int, str], None] = record_response):
        self.app = app
        self.record = record

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})
        status = None

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        except BaseException as e:
            status = status or status_of(e)
            raise
        finally:
            status = status or 500
            route = getattr(scope.get("route"), "path", "unmatched")  # a template, never the raw path
            self.record(route, scope["method"], status, tenant_of(scope))


def instrument(api) -> None:
    """Count every response of the FastAPI app ``api`` in ``medserve_requests``."""
    api.add_middleware(ResponseCounter)


class ReplicaMetrics:
    """Made in each replica's ``__init__``: reports the replica's GPU memory every few seconds and,
    for a model replica, the size of each batch."""

    def __init__(self, model: str | None = None):
        import ray
        from ray.serve import metrics

        self.model = model
        # ray.serve.metrics adds the deployment, replica and application labels.
        self._gpu_memory = metrics.Gauge(
            "medserve_replica_gpu_memory_bytes",
            description="CUDA memory this replica's torch holds (kind: allocated or reserved); 0 without a GPU.",
            tag_keys=("kind",),
        )
        self._batch_size = metrics.Histogram(
            "medserve_batch_size",
            description="Requests in each batch a model replica ran.",
            boundaries=BATCH_SIZE_BUCKETS,
            tag_keys=("model",),
        )
        # Where Ray placed the replica: which GPUs of its node it was given (their indices there, "none" without).
        # Replicas spread evenly over a node's GPUs show as equal counts per gpu value.
        metrics.Gauge(
            "medserve_replica_gpus",
            description="1 for each replica, labelled with the GPUs (indices on its node) Ray gave it; 'none' if none.",
            tag_keys=("gpu",),
        ).set(1, tags={"gpu": ",".join(str(i) for i in ray.get_gpu_ids()) or "none"})
        threading.Thread(target=self._report_gpu_memory, name="medserve-gpu-memory", daemon=True).start()

    def batch(self, size: int) -> None:
        self._batch_size.observe(size, tags={"model": self.model})

    def _report_gpu_memory(self) -> None:
        while True:
            for kind, value in replica_gpu_memory().items():
                self._gpu_memory.set(value, tags={"kind": kind})
            time.sleep(GPU_MEMORY_REPORT_INTERVAL_S)


def replica_gpu_memory() -> dict[str, int]:
    """Bytes of CUDA memory this process's torch holds."""
    # A replica that never imported torch (the ingress) holds no CUDA memory: don't import it for this.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {"allocated": 0, "reserved": 0}
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}


class WsiJobMetrics:
    """The metrics of one whole-slide-image job, recorded by its driver (``serve_app.wsi.job_driver``).

    Make one when a job starts, set ``total_tiles`` as its slides are planned, call ``tiles_done`` as tiles
    finish and ``finished`` once. ``job_id`` is the server's job id, never a slide's file name or a patient
    field (the label is not ``job``: Prometheus keeps that for its scrape job).
    """

    def __init__(self, job_id: str, model: str, tenant: str, total_tiles: int = 0):
        self.tags = {"model": model, "tenant": tenant}
        self.job_tags = {"job_id": job_id, **self.tags}
        self.total_tiles = total_tiles
        self.done = 0
        self.progress_gauge, self.tiles, self.jobs = _wsi_metrics()
        self.progress_gauge.set(0.0, tags=self.job_tags)

    def tiles_done(self, n: int) -> None:
        self.done += n
        self.tiles.inc(n, tags=self.tags)
        self.progress_gauge.set(self.done / max(self.total_tiles, 1), tags=self.job_tags)

    def finished(self, status: str) -> None:
        """``status``: ``done``, ``failed`` or ``cancelled``."""
        self.progress_gauge.set(1.0 if status == "done" else self.done / max(self.total_tiles, 1), tags=self.job_tags)
        self.jobs.inc(tags={**self.tags, "status": status})


@functools.cache
def _wsi_metrics():
    from ray.util import metrics

    progress = metrics.Gauge(
        "medserve_wsi_job_progress",
        description="Fraction (0..1) of a WSI job's tiles done.",
        tag_keys=("job_id", "model", "tenant"),
    )
    tiles = metrics.Counter(
        "medserve_wsi_tiles", description="WSI tiles processed; rate() gives tiles/s.", tag_keys=("model", "tenant")
    )
    jobs = metrics.Counter(
        "medserve_wsi_jobs",
        description="WSI jobs finished, by status (done, failed, cancelled).",
        tag_keys=("model", "tenant", "status"),
    )
    return progress, tiles, jobs


@functools.cache
def _dicom_network_metrics():
    from ray.util import metrics

    instances = metrics.Counter(
        "medserve_dicom_instances",
        description="C-STOREs the DICOM listener answered, by tenant and outcome (stored, duplicate: a re-send "
        "already on disk, refused).",
        tag_keys=("tenant", "outcome"),
    )
    series = metrics.Counter(
        "medserve_dicom_series",
        description="Series the DICOM node found complete, by tenant and outcome (routed, unrouted: no route took it).",
        tag_keys=("tenant", "outcome"),
    )
    inbox = metrics.Gauge(
        "medserve_dicom_inbox_instances",
        description="Instances received by the DICOM listener and not yet processed, per tenant.",
        tag_keys=("tenant",),
    )
    deliveries = metrics.Counter(
        "medserve_dicom_deliveries",
        description="Tries of result deliveries, by destination and outcome (delivered, retried: to be tried again, "
        "failed: given up).",
        tag_keys=("destination", "outcome"),
    )
    pending = metrics.Gauge(
        "medserve_dicom_deliveries_pending",
        description="Result deliveries waiting for their destination.",
        tag_keys=("destination",),
    )
    oldest = metrics.Gauge(
        "medserve_dicom_oldest_pending_delivery_seconds",
        description="Age of the oldest result delivery waiting for its destination (0 when none waits).",
        tag_keys=("destination",),
    )
    return instances, series, inbox, deliveries, pending, oldest


def count_dicom_instance(tenant: str, outcome: str) -> None:
    """``outcome``: stored, duplicate or refused."""
    _dicom_network_metrics()[0].inc(tags={"tenant": tenant, "outcome": outcome})


def count_dicom_series(tenant: str, routed: bool) -> None:
    _dicom_network_metrics()[1].inc(tags={"tenant": tenant, "outcome": "routed" if routed else "unrouted"})


def set_dicom_inbox_depth(tenant: str, instances: int) -> None:
    _dicom_network_metrics()[2].set(instances, tags={"tenant": tenant})


def count_delivery(destination: str, outcome: str) -> None:
    """``destination`` is its name in the config; ``outcome``: delivered, retried or failed."""
    _dicom_network_metrics()[3].inc(tags={"destination": destination, "outcome": outcome})


def set_delivery_backlog(destination: str, pending: int, oldest_age_s: float) -> None:
    _, _, _, _, pending_gauge, oldest_gauge = _dicom_network_metrics()
    pending_gauge.set(pending, tags={"destination": destination})
    oldest_gauge.set(oldest_age_s, tags={"destination": destination})


@functools.cache
def _input_drift_metrics():
    from ray.util import metrics

    inputs = metrics.Counter(
        "medserve_inputs",
        description="Inputs read, per model version and category feature (modality, manufacturer, "
        "slice_thickness_mm, pixel_spacing_mm, mpp) and its value (a fixed set).",
        tag_keys=("model", "version", "feature", "value"),
    )
    psi = metrics.Gauge(
        "medserve_input_drift_psi",
        description="Population stability index of a feature of a model version's last inputs (this process's "
        "window) against the model's reference; over 0.25: drifted.",
        tag_keys=("model", "version", "feature"),
    )
    fractions = metrics.Gauge(
        "medserve_input_bin_fraction",
        description="Fraction of a model version's inputs in each bin of a feature: population recent (this "
        "process's window) or reference.",
        tag_keys=("model", "version", "feature", "bin", "population"),
    )
    window = metrics.Gauge(
        "medserve_input_drift_window_inputs",
        description="Inputs in this process's drift window of a model version (at most the configured window).",
        tag_keys=("model", "version"),
    )
    return inputs, psi, fractions, window


def record_input_drift(model: str, version: str, categories: Mapping[str, str], readings: Mapping, inputs: int) -> None:
    """Called by ``serve_app.observability.input_drift.InputMonitor`` after each input: its category features'
    values (``categories``: feature -> a value of a fixed set), the drift ``readings`` of each feature (``psi``,
    ``bins``, and the ``reference`` and ``recent`` fraction of each bin) and the ``inputs`` in its window."""
    counter, psi, fractions, window = _input_drift_metrics()
    tags = {"model": model, "version": version}
    for feature, value in categories.items():
        counter.inc(tags={**tags, "feature": feature, "value": value})
    window.set(inputs, tags=tags)
    for feature, reading in readings.items():
        psi.set(reading.psi, tags={**tags, "feature": feature})
        for population, values in (("reference", reading.reference), ("recent", reading.recent)):
            for label, fraction in zip(reading.bins, values, strict=True):
                fractions.set(fraction, tags={**tags, "feature": feature, "bin": label, "population": population})


# Dice between a shadowed candidate's mask and the live one's: fine steps near 1, where a good candidate lies.
AGREEMENT_BUCKETS = [0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0]


@functools.cache
def _rollout_metrics():
    from ray.util import metrics

    runs = metrics.Counter(
        "medserve_rollout_runs",
        description="Studies a rollout routed, by model, version, role (live, shadow, canary) and outcome (ok, "
        "error: a server error; dropped: a shadow run not started because the replica's shadow runs were busy).",
        tag_keys=("model", "version", "role", "outcome"),
    )
    agreement = metrics.Histogram(
        "medserve_rollout_agreement_dice",
        description="Mean Dice over the labels between a shadowed candidate's mask and the live version's, per "
        "model and candidate version.",
        boundaries=AGREEMENT_BUCKETS,
        tag_keys=("model", "version"),
    )
    seconds = metrics.Histogram(
        "medserve_rollout_run_duration_seconds",
        description="Seconds a study took through the stages in a rollout, per model, version and role.",
        boundaries=LATENCY_BUCKETS_S,
        tag_keys=("model", "version", "role"),
    )
    aborted = metrics.Counter(
        "medserve_rollout_aborted",
        description="Rollouts that aborted themselves (an abort threshold crossed), by model and candidate version; "
        "an operator's `medserve rollout abort` is audited, not counted.",
        tag_keys=("model", "version"),
    )
    return runs, agreement, seconds, aborted


def count_rollout_run(model: str, version: str, role: str, outcome: str, seconds: float | None = None) -> None:
    """A study a rollout routed: ``role`` live, shadow or canary; ``outcome`` ok, error or dropped; ``seconds`` its
    time through the stages when it ran."""
    runs, _, latency, _ = _rollout_metrics()
    runs.inc(tags={"model": model, "version": version, "role": role, "outcome": outcome})
    if seconds is not None:
        latency.observe(seconds, tags={"model": model, "version": version, "role": role})


def observe_rollout_agreement(model: str, version: str, mean_dice: float) -> None:
    _rollout_metrics()[1].observe(mean_dice, tags={"model": model, "version": version})


def count_rollout_aborted(model: str, version: str) -> None:
    _rollout_metrics()[3].inc(tags={"model": model, "version": version})
