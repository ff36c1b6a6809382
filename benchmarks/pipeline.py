"""Side by side, same inputs, one run: where does a request's time go, and what does serving cost?

  a. reference  - the MONAI CPU path: CPU transforms, torch fp32 eager, CPU postprocessing
  b. bare       - one process, no Serve: GPU pre, best engine and batch size, GPU post
  c. handles    - medserve through DeploymentHandles (fused and split layouts)
  d. http       - medserve through HTTP (uploads of the same volume)

    python -m benchmarks.pipeline --size full    # the GPU machine (README: Benchmarks)
    python -m benchmarks.pipeline --size small   # a CPU machine; `--size tiny` is CI's smoke run

Writes benchmarks/results/pipeline-<size>-<device>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gzip
import json
import math
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
import uuid
import zipfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

from benchmarks.cpu_accounting import CpuSampler
from benchmarks.http_load import HttpLoad, closed_loop, open_loop
from serve_app.config import EMBEDDED_MODEL_REPOSITORY, AppConfig, HttpConfig, LimitsConfig, load_config
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import EngineSpec, ModelSpec, read_model_spec
from serve_app.ray_security import apply_environment, haproxy_environment, token_environment
from serve_app.results import ResultStore
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series
from serve_app.segmentation.stages import Postprocessor, Predictor, Preprocessor
from serve_app.segmentation.transforms import to_model_input
from serve_app.studies.nifti import read_nifti
from serve_app.studies.volume import Volume
from serve_app.tenancy.gatekeeper import ANONYMOUS

RESULTS = Path(__file__).with_name("results")
LAYOUTS = ("fused", "split")
HTTP_PHASES = ("http", "http_dicom_zip", "http_nii_gz", "http_gzip", "http_zstd")  # http_uploads' names
METRICS_PORT = 18700  # Ray's metrics agent, for scraping replica metrics during a run (gpu_session.sh)


@dataclass(frozen=True)
class Size:
    volume: tuple[int, int, int]
    spacing: tuple[float, float, float]
    model_input: tuple[int, int, int]  # the MSD-spleen UNet's input (224^3 in the tutorial)
    requests: int  # per measured phase
    concurrency: int
    reference_requests: int
    open_loop_s: float  # each open loop's length
    client_processes: int  # HTTP load generators: one Python process cannot send 157 MB uploads fast enough


SIZES = {
    # CI's smoke run: every phase and code path, each with two rounds of two requests (two make the slowest two).
    "tiny": Size((96, 96, 32), (3.6, 3.6, 6.0), (48, 48, 48), 4, 2, 2, 2.0, 1),
    "small": Size((256, 256, 96), (1.4, 1.4, 3.0), (96, 96, 96), 16, 4, 3, 10.0, 2),
    # Open loops of 20 s: about 500 requests over HTTP, so that p99 is not the third-worst latency of 250.
    "full": Size((512, 512, 300), (0.8, 0.8, 1.0), (224, 224, 224), 48, 16, 2, 20.0, 4),
}
ORGAN_FRACTION = 0.004  # of the volume: a 200 mL spleen in a 512x512x300 CT's 50 L field of view
SPLEEN_UNET = {  # the MONAI spleen-segmentation tutorial's network
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
    "norm": "batch",
}


def write_repository(root: Path, size: Size, study: Path) -> Path:
    """A model repository with the spleen-tutorial UNet and the embedded default model. The UNet's
    weights are random (speed does not depend on them), its output shifted to an organ's size."""
    from monai.networks.nets import UNet

    spleen = root / "msd-spleen-unet"
    spleen.mkdir(parents=True)
    (spleen / "model.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "msd-spleen-unet",
                "version": "0+bench",
                "modality": "CT",
                "labels": {0: "background", 1: "spleen"},
                "preprocessing": {
                    "orientation": "RAS",
                    "intensity_window": {"a_min": -57, "a_max": 164},
                    "spatial_size": list(size.model_input),
                },
                "network": {"name": "UNet", "args": SPLEEN_UNET},
                "weights": {"file": "model.pt", "format": "monai_state_dict"},
            }
        )
    )
    torch.manual_seed(0)
    network = UNet(**SPLEEN_UNET).eval()
    shift_to_organ_size(network, read_model_spec(spleen / "model.yaml"), study)
    torch.save(network.state_dict(), spleen / "model.pt")
    shutil.copytree(EMBEDDED_MODEL_REPOSITORY / "ct-phantom-organ", root / "ct-phantom-organ")
    return root


def shift_to_organ_size(network: torch.nn.Module, spec: ModelSpec, study: Path) -> None:
    """Random weights call most of a CT "spleen"; a real spleen is about 0.4 % of the volume, and
    postprocessing's cost follows the organ's size (it works in the organ's box). Shift the output's
    background logit so that this much of the model's grid on the study is foreground."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    image = to_model_input(read_nifti(study, LimitsConfig()), spec.preprocessing, device)
    network.to(device)
    with torch.inference_mode():
        logits = network(image.as_tensor()[None])[0]
    margin = (logits[1] - logits[0]).flatten()
    shift = margin.kthvalue(int(margin.numel() * (1 - ORGAN_FRACTION))).values.item()
    network.model[-1][1].conv.unit0.conv.bias.data[0] += shift  # the last layer: logits = conv(x) + x
    network.cpu()


def study_volume(size: Size) -> Volume:
    """A CT-like int16 volume: the one study every phase reads, as NIfTI, DICOM or compressed."""
    phantom = ct_phantom(np.random.default_rng(0), shape=size.volume, spacing=size.spacing)
    array = np.clip(np.rint(phantom.volume.array), -1024, 3071).astype(np.int16)
    return Volume(array=array, affine=phantom.volume.affine)


def write_study(path: Path, volume: Volume) -> Path:
    """The study as one uncompressed NIfTI: reading it costs little, so the figures are the pipeline's, not
    pydicom's (DICOM decoding is timed separately in `decode_ms`, and served in the DICOM phase)."""
    nib.save(nib.Nifti1Image(volume.array, volume.affine), str(path))
    return path


def with_engine(spec: ModelSpec, **options) -> ModelSpec:
    return spec.model_copy(update={"engine": EngineSpec(**{**spec.engine.model_dump(), **options})})


class GpuSampler:
    """Mean GPU utilisation over a phase, from NVML; None without a GPU. ``window`` (epoch seconds) narrows the
    mean to part of the phase: the timed part of an HTTP load, not its client processes' start and warm-up."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self._nvml = None
        self.samples: list[float] = []
        self.times: list[float] = []
        self.window: tuple[float, float] | None = None

    def __enter__(self):
        self.samples, self.times, self._stop = [], [], threading.Event()
        if self._nvml:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.1):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self.times.append(time.time())

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self):
        start, end = self.window or (-math.inf, math.inf)
        samples = [x for x, t in zip(self.samples, self.times, strict=True) if start <= t <= end]
        return round(statistics.fmean(samples), 1) if samples else None


def percentiles(latencies_s: list[float]) -> dict:
    ms = [x * 1000 for x in latencies_s]
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def slowest_ms(latencies_s: list[float], timings_ms: list[dict], n: int = 2) -> list[dict]:
    """A closed loop's ``n`` slowest requests, slowest first: each one's latency and where its time went at the server
    (``timings_ms[i]`` is the request of ``latencies_s[i]``). Of 96 requests, the two slowest decide the p99."""
    pairs = sorted(zip(latencies_s, timings_ms, strict=True), key=lambda pair: pair[0], reverse=True)[:n]
    return [{"latency": round(s * 1000, 1), **{k: round(ms, 1) for k, ms in timings.items()}} for s, timings in pairs]


def summarise(latencies_s: list[float], wall_s: float, gpu: GpuSampler, **extra) -> dict:
    return {
        "volumes_per_s": round(len(latencies_s) / wall_s, 3),
        **percentiles(latencies_s),
        "requests": len(latencies_s),
        "gpu_util_percent": gpu.mean,
        **extra,
    }


class Uploads:
    """Fresh upload folders holding the study, as the ingress spools them (hard links to one copy in ``root``: no
    copy cost per request)."""

    def __init__(self, root: Path, study: bytes):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.study = root / f"study-{uuid.uuid4().hex}"
        self.study.write_bytes(study)

    def new(self) -> Path:
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        os.link(self.study, folder / "study")
        return folder


def run_stages_in_process(
    spec: ModelSpec,
    device: str,
    uploads: Uploads,
    results: ResultStore,
    requests: int,
    batch: int,
    gpu: GpuSampler,
    result_ids: list[str],
) -> dict:
    """a (CPU) and b (GPU): the stage objects medserve's replicas use, called in one process; the results' ids
    are appended to ``result_ids``."""
    preprocessor = Preprocessor(load_config().limits, torch.device(device))
    predictor = Predictor(spec, torch.device(device))
    postprocessor = Postprocessor(results)

    def pre(_):
        return preprocessor(uploads.new(), spec)

    def post(args):
        logits, prepared = args
        result_ids.append(uuid.uuid4().hex)
        return postprocessor(logits, prepared.model_affine, prepared.grid, spec, result_ids[-1])

    def one_batch(pool) -> float:
        t0 = time.perf_counter()
        prepared = list(pool.map(pre, range(batch)))
        logits = predictor([study.image for study in prepared])
        list(pool.map(post, zip(logits, prepared, strict=True)))
        return time.perf_counter() - t0

    with ThreadPoolExecutor(batch) as pool:
        one_batch(pool)  # warm-up: allocator, cuDNN algorithms, CUDA graphs
        with gpu:
            start = time.perf_counter()
            latencies = [one_batch(pool) for _ in range(max(requests // batch, 1))]
            wall = time.perf_counter() - start
    return summarise([x for x in latencies for _ in range(batch)], wall, gpu, batch_size=batch)


def best_engine(spec: ModelSpec, device: str, size: Size) -> tuple[ModelSpec, int, dict]:
    """The fastest engine options and batch size for the network alone, timed on the device."""
    if device == "cpu":
        return spec, 1, {}
    variants = {
        "fp32": {},
        "fp16": {"precision": "fp16"},
        "fp16+channels_last": {"precision": "fp16", "channels_last": True},
        "fp16+channels_last+cuda_graphs": {"precision": "fp16", "channels_last": True, "cuda_graphs": True},
    }
    table, best = {}, (0.0, spec, 1)
    for name, options in variants.items():
        candidate = with_engine(spec, **options)
        predictor = Predictor(candidate, torch.device(device))
        for batch in (1, 2, 4):
            images = [torch.rand((1, *size.model_input), device=device) for _ in range(batch)]
            predictor(images)
            torch.cuda.synchronize()
            start, rounds = time.perf_counter(), 10
            for _ in range(rounds):
                predictor(images)
            torch.cuda.synchronize()
            per_s = rounds * batch / (time.perf_counter() - start)
            table[f"{name} bs{batch}"] = round(per_s, 1)
            if per_s > best[0]:
                best = (per_s, candidate, batch)
        del predictor
        torch.cuda.empty_cache()
    return best[1], best[2], table


@dataclass(frozen=True)
class ServeSettings:
    """What a serving session is run with: the ingress, how the replicas share the GPU, where uploads spool."""

    ingress: str  # http.ingress: "haproxy" or "proxy"
    gpu_sharing: str  # "mps" or "time-slicing"
    uploads_root: Path | None  # storage.uploads_root; None: <storage root>/uploads
    fused_replicas: int = 4  # fused layout on a GPU: this many replicas share the GPUs, gpus/fused_replicas each
    gpus: int = 1  # GPUs the fused replicas spread over: a multiple of them, so each GPU holds as many
    ingress_replicas: int = 8  # on a GPU node (one on a CPU-only machine): each replica's event loop is one core
    throughput_optimized: bool = False  # http.throughput_optimized: Serve's throughput-optimized data plane

    def label(self) -> str:
        return f"{self.ingress}+{self.gpu_sharing}+{'throughput-optimized' if self.throughput_optimized else 'default'}"

    def http(self, port: int) -> HttpConfig:
        """The application's ``http`` section: also what Ray's environment is made from (``ray_environment``)."""
        return HttpConfig(port=port, ingress=self.ingress, throughput_optimized=self.throughput_optimized)


# Model replicas' queue: two batches' worth, one running and one filling (Serve's router sends a replica no more).
MODEL_MAX_ONGOING = 2


def serve_config(
    storage: Path, repository: Path, layout: str, gpu: bool, batch: int, port: int, settings: ServeSettings
) -> AppConfig:
    """``settings.fused_replicas`` fused replicas sharing ``settings.gpus`` GPUs evenly (each asks for
    ``gpus / fused_replicas`` of one: Ray fills every GPU alike), or the GPU shared by split stages."""
    ongoing = MODEL_MAX_ONGOING * batch
    if gpu and layout == "fused":
        deployments = {
            "model": {
                "num_replicas": settings.fused_replicas,
                "num_gpus": settings.gpus / settings.fused_replicas,
                "num_cpus": 1,
                "max_ongoing_requests": ongoing,
            }
        }
    elif gpu:
        deployments = {
            "preprocess": {"num_replicas": 2, "num_gpus": 0.125, "num_cpus": 1},
            "model": {"num_replicas": 2, "num_gpus": 0.25, "num_cpus": 1, "max_ongoing_requests": ongoing},
            "postprocess": {"num_replicas": 2, "num_gpus": 0.125, "num_cpus": 1},
        }
    else:
        deployments = {"model": {"num_cpus": 0.5}}
    deployments.setdefault("model", {})["batching"] = {"max_batch_size": batch, "batch_wait_timeout_s": 0.02}
    return AppConfig.model_validate(
        {
            "name": layout,
            "layout": layout,
            "model_repository": repository,
            # An ingress replica's event loop is one core: on the H200 one spent 250 CPU-ms receiving a 157 MB
            # upload (2026-12-03, run 8), so a busy GPU node needs several.
            "deployments": {
                **deployments,
                "ingress": {"num_replicas": settings.ingress_replicas if gpu else 1, "num_cpus": 0.25},
            },
            "storage": {"root": storage, "uploads_root": settings.uploads_root and settings.uploads_root / layout},
            "http": settings.http(port),
            "gpu_sharing": settings.gpu_sharing,
        }
    )


@contextlib.contextmanager
def serving(settings: ServeSettings, port: int, grpc_options=None):
    """A Ray cluster and Serve, started as ``settings`` say (MPS started first, the ingress chosen by Ray's
    environment), with Serve's gRPC proxy where ``grpc_options`` (``serve.config.gRPCOptions``) are given;
    everything stopped after."""
    import ray
    from ray import serve

    from serve_app import mps

    saved = dict(os.environ)
    env = settings.http(port).ray_environment()
    # HAProxy's stats and metrics ports free ones, and its sockets and config in a folder of this cluster's own, beside
    # any other cluster on this machine (a test session's among them, whose environment this process may inherit);
    # token authentication with a token of its own, as every cluster medserve starts.
    env |= {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}
    env |= haproxy_environment(Path(tempfile.mkdtemp(prefix="mshap-", dir="/tmp"))) | token_environment()
    if settings.gpu_sharing == "mps":
        env |= mps.start()
    apply_environment(env)  # Ray's cached config and token reloaded too
    try:
        ray.init(
            address="local",
            include_dashboard=False,
            logging_level="ERROR",
            num_cpus=max(os.cpu_count() or 2, 4),
            _metrics_export_port=METRICS_PORT,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port}, grpc_options=grpc_options)
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        if settings.gpu_sharing == "mps":
            mps.stop()


class HandleLoop:
    """One event loop, running in a thread of its own for a serving session, that every handle call of the
    benchmark runs on. In Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in this process's
    environment, as where a shell exports it for Ray) a handle routes on the loop it was first called from, and
    stops receiving the controller's updates once that loop stops, as each ``asyncio.run`` stops its own.

    Usage::

        with HandleLoop() as handle_loop:
            latencies, wall, outcomes = handle_loop.run(closed_loop(app.call, 96, 16))
    """

    def __enter__(self) -> HandleLoop:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="handle-loop", daemon=True)
        self._thread.start()
        return self

    def run(self, coroutine):
        """``coroutine`` run to its end on the loop; its result, or its error raised here."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __exit__(self, *exc_info) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def breakdown(timings_ms: list[dict]) -> dict:
    """Where the requests' time went at the server: each stage's mean of ``timings_ms``."""
    return {k: round(statistics.fmean(t[k] for t in timings_ms), 1) for k in timings_ms[0]}


class Fidelity:
    """Dice of a phase's mask against the MONAI CPU reference's (a), on the same study: label 1, the organ."""

    def __init__(self, reference: np.ndarray):
        self.reference = reference

    def of(self, results: ResultStore, result_id: str, *, via_ingress: bool = False) -> float:
        return dice(self.reference, mask_of(results, result_id, via_ingress=via_ingress))


def mask_of(results: ResultStore, result_id: str, *, via_ingress: bool = False) -> np.ndarray:
    """A stored result's organ (label 1) on the study's whole grid. The ingress committed the result of an HTTP
    request (the open app's tenant: ``ANONYMOUS``); one made through handles or in process is committed here."""
    if not via_ingress:
        results.commit(result_id, ANONYMOUS)
    return np.asarray(nib.load(results.mask_path(result_id, ANONYMOUS)).dataobj) == 1


def dice(a: np.ndarray, b: np.ndarray) -> float:
    both = a.sum() + b.sum()
    return round(float(2 * np.logical_and(a, b).sum() / both), 4) if both else 1.0


@dataclass(frozen=True)
class HttpUpload:
    """One phase's request body: the study as some client sends it."""

    name: str
    body: bytes
    headers: dict


def http_uploads(study: Path, dicom_zip: Path) -> list[HttpUpload]:
    """The same volume as raw NIfTI (d), a zipped DICOM series, .nii.gz, and raw NIfTI sent with
    Content-Encoding gzip and zstd."""
    import zstandard

    raw = study.read_bytes()
    gzipped = gzip.compress(raw, compresslevel=1)  # a fast client's choice
    octets = {"content-type": "application/octet-stream"}
    return [
        HttpUpload("http", raw, octets),
        HttpUpload("http_dicom_zip", dicom_zip.read_bytes(), {"content-type": "application/zip"}),
        HttpUpload("http_nii_gz", gzipped, octets),
        HttpUpload("http_gzip", gzipped, {**octets, "content-encoding": "gzip"}),
        HttpUpload(
            "http_zstd", zstandard.ZstdCompressor(level=3).compress(raw), {**octets, "content-encoding": "zstd"}
        ),
    ]


def measure_serve(
    spec: ModelSpec,
    size: Size,
    work: Path,
    repository: Path,
    uploads: list[HttpUpload],
    fidelity: Fidelity,
    batch: int,
    gpu: bool,
    settings: ServeSettings,
    layouts: tuple[str, ...],
    http_concurrencies: tuple[int, ...] = (),
) -> dict:
    """c for each of ``layouts`` through DeploymentHandles; then, on the faster one, the open-loop run through handles,
    every HTTP upload phase (d first), d again at each of ``http_concurrencies``, the transport ceiling and the
    open-loop run over HTTP."""
    import ray
    from ray import serve

    from benchmarks.transport import BodySink

    port, out = 18600, {}
    # The loop outlives Serve: serve.shutdown() shuts each handle's router down on the loop it routes on.
    # One layout's app deployed at a time (``current_app``: closing it deletes the app); the last one measured stays
    # for d when it is the faster (a deployment is most of a small run's time).
    with HandleLoop() as handle_loop, serving(settings, port), contextlib.ExitStack() as current_app:
        configs = [serve_config(work / f"storage-{k}", repository, k, gpu, batch, port, settings) for k in layouts]
        _check_cpus(configs, ray.cluster_resources().get("CPU", 0))
        for layout, config in zip(layouts, configs, strict=True):
            current_app.close()
            app = current_app.enter_context(deployed(config, uploads[0].body))
            handle_loop.run(closed_loop(app.call, size.concurrency, size.concurrency))  # warm-up
            with GpuSampler() as gpu_sampler, CpuSampler() as cpu:
                latencies, wall, outcomes = handle_loop.run(closed_loop(app.call, size.requests, size.concurrency))
            timings_ms = [{k: s * 1000 for k, s in o.timings.model_dump().items()} for o in outcomes]
            progress(out, f"handles_{layout}", summarise(
                latencies,
                wall,
                gpu_sampler,
                breakdown_ms=breakdown(timings_ms),
                slowest_ms=slowest_ms(latencies, timings_ms),
                dice_vs_reference=fidelity.of(app.results, app.result_ids[-1]),
                cpu=cpu.per_request(len(latencies)),
            ))  # fmt: skip
        faster = max(layouts, key=lambda k: out[f"handles_{k}"]["volumes_per_s"])
        config = configs[layouts.index(faster)]
        if faster != layouts[-1]:
            current_app.close()
        # The sink's replicas are the ingress's, CPUs included (Serve's default, 1 CPU a replica, would leave eight
        # fused replicas' app unschedulable on 16 cores beside it).
        ingress = config.deployments.ingress
        sink = BodySink.options(num_replicas=ingress.num_replicas, ray_actor_options={"num_cpus": ingress.num_cpus})
        serve.run(sink.bind(), name="sink", route_prefix="/sink", blocking=False)
        if faster != layouts[-1]:
            app = current_app.enter_context(deployed(config, uploads[0].body))
        handle_loop.run(closed_loop(app.call, size.concurrency, size.concurrency))  # warm-up, as for c
        rate = 0.8 * out[f"handles_{faster}"]["volumes_per_s"]
        steady = handle_loop.run(open_loop(app.call, rate, size.open_loop_s))
        progress(out, "open_loop_80pct", {"layout": faster, "rate_per_s": round(rate, 2), **percentiles(steady)})
        url = f"http://127.0.0.1:{port}"
        for upload in uploads:
            progress(out, upload.name, measure_http(f"{url}/{config.name}", spec, upload, size, fidelity, app.results))
        for concurrency in http_concurrencies:
            figures = measure_http(f"{url}/{config.name}", spec, uploads[0], size, fidelity, app.results, concurrency)
            out.setdefault("http_at_concurrency", {})[str(concurrency)] = figures
            progress(None, f"http_at_concurrency_{concurrency}", figures)
        progress(out, "transport_ceiling", measure_transport(f"{url}/sink/", uploads[0], size))
        out["http"]["of_transport_ceiling"] = round(
            out["http"]["volumes_per_s"] / out["transport_ceiling"]["uploads_per_s"], 3
        )
        rate = 0.8 * out["http"]["volumes_per_s"]
        progress(out, "open_loop_http_80pct", open_loop_http(f"{url}/{config.name}", spec, uploads[0], size, rate))
        out["faster_layout"] = faster
        out["settings"] = settings_of(settings, config)
    return out


def measure_alternative(
    spec: ModelSpec,
    size: Size,
    work: Path,
    repository: Path,
    uploads: list[HttpUpload],
    fidelity: Fidelity,
    batch: int,
    layout: str,
    gpu: bool,
    settings: ServeSettings,
) -> dict:
    """d, and the DICOM phase where the run has it (``COMPARED_PHASES`` of ``uploads``), under other settings, for
    the side-by-side table of settings."""
    port = 18600
    with serving(settings, port):
        config = serve_config(work / f"storage-{settings.label()}", repository, layout, gpu, batch, port, settings)
        url = f"http://127.0.0.1:{port}/{config.name}"
        with deployed(config, uploads[0].body) as app:
            phases = {
                upload.name: measure_http(url, spec, upload, size, fidelity, app.results)
                for upload in uploads
                if upload.name in COMPARED_PHASES
            }
    return {"settings": settings_of(settings, config), **phases}


def progress(out: dict | None, phase: str, figures: dict) -> None:
    """``out[phase] = figures`` (unless ``out`` is None), and a line on stdout as each phase ends (a long run shows
    where it is)."""
    if out is not None:
        out[phase] = figures
    print(f"{phase}: {json.dumps(figures)}", flush=True)


def settings_of(settings: ServeSettings, config: AppConfig) -> dict:
    model = config.deployments.model
    return {
        "ingress": settings.ingress,
        "throughput_optimized": settings.throughput_optimized,
        "gpu_sharing": settings.gpu_sharing,
        "uploads_root": str(settings.uploads_root) if settings.uploads_root else "storage root (disk)",
        "model_replicas": model.num_replicas,
        "ingress_replicas": config.deployments.ingress.num_replicas,
        "batch_size": model.batching.max_batch_size,
        "batch_wait_timeout_s": model.batching.batch_wait_timeout_s,
        "max_ongoing_requests": model.max_ongoing_requests,
        "dicom_header_processes": config.reading.header_processes(),
    }


@dataclass
class DeployedApp:
    """An application deployed at /<name>: ``call`` sends the study through its handles; ``result_ids`` lists the
    results made, in ``results``."""

    call: object
    results: ResultStore
    result_ids: list[str]


@contextlib.contextmanager
def deployed(config: AppConfig, study: bytes):
    """The application deployed at /<name>."""
    from ray import serve

    from serve_app.app import build_app
    from serve_app.segmentation.stage_handles import StageHandles

    serve.run(build_app(config), name=config.name, route_prefix=f"/{config.name}", blocking=False)
    (spec,) = [m for m in ModelRepository(config.model_repository) if m.task == "segmentation"]
    handle = lambda deployment: serve.get_deployment_handle(deployment, config.name)  # noqa: E731
    if config.fused:
        stages = StageHandles({spec.key: handle(f"FusedPipeline:{spec.key}")})
    else:
        stages = StageHandles(
            {spec.key: handle(f"ModelReplica:{spec.key}")}, handle("Preprocess"), handle("Postprocess")
        )
    uploads = Uploads(config.storage.uploads, study)
    app = DeployedApp(call=None, results=ResultStore.of(config.storage), result_ids=[])

    async def call():
        result_id = uuid.uuid4().hex
        app.result_ids.append(result_id)
        return await stages.segment(spec, uploads.new(), result_id)

    app.call = call
    try:
        yield app
    finally:
        serve.delete(config.name)


def cpus_asked(config: AppConfig) -> float:
    """The CPUs ``config``'s ingress and segmentation replicas ask Ray for, with the transport ceiling's sink beside
    them (as many replicas as the ingress, each with its CPUs)."""
    deployments = config.deployments
    stages = (
        [deployments.model] if config.fused else [deployments.preprocess, deployments.model, deployments.postprocess]
    )
    ingress = deployments.ingress
    return sum(stage.num_replicas * stage.num_cpus for stage in stages) + 2 * ingress.num_replicas * ingress.num_cpus


def _check_cpus(configs: list[AppConfig], cpus: float) -> None:
    """Exit at once where a layout's replicas, with the sink beside them, ask for more CPUs than the Ray node has:
    Serve would wait for the rest until the session's time ran out (32 ingress replicas did on an H200 node)."""
    for config in configs:
        if (asked := cpus_asked(config)) > cpus:
            raise SystemExit(
                f"the {config.name} layout and the transport ceiling's sink ask Ray for {asked:g} CPUs "
                f"({config.deployments.ingress.num_replicas} ingress replicas and as many sink replicas at "
                f"{config.deployments.ingress.num_cpus:g} each, besides the segmentation replicas); this node has "
                f"{cpus:g}: ask for fewer --ingress-replicas or --fused-replicas"
            )


def measure_http(
    url: str,
    spec: ModelSpec,
    upload: HttpUpload,
    size: Size,
    fidelity: Fidelity,
    results: ResultStore,
    concurrency: int | None = None,
) -> dict:
    """``size.requests`` uploads at ``concurrency`` (``size.concurrency`` by default) in a closed loop: throughput,
    latency, GPU utilisation, where a request's time went at the server (on average, and for the two slowest
    requests) and the machine's CPU time by process."""
    concurrency = concurrency or size.concurrency
    load = HttpLoad(f"{url}/v1/models/{spec.name}/segment", upload.body, upload.headers, size.client_processes)
    with GpuSampler() as gpu, CpuSampler() as cpu:
        run = load.closed(size.requests, concurrency)
    gpu.window = cpu.window = run.window
    timings = [a["timings_ms"] for a in run.answers]
    return summarise(
        run.latencies_s,
        run.wall_s,
        gpu,
        breakdown_ms=breakdown(timings),
        slowest_ms=slowest_ms(run.latencies_s, timings),
        upload_mb=round(len(upload.body) / 1e6, 1),
        dice_vs_reference=fidelity.of(results, run.answers[-1]["result_id"], via_ingress=True),
        concurrency=concurrency,
        cpu=cpu.per_request(len(run.latencies_s)),
    )


def measure_transport(url: str, upload: HttpUpload, size: Size) -> dict:
    """The same uploads, at the same concurrency and through the same ingress, to an app that only receives them."""
    load = HttpLoad(url, upload.body, upload.headers, size.client_processes)
    with CpuSampler() as cpu:
        run = load.closed(size.requests * 2, size.concurrency)
    cpu.window = run.window
    mb_per_s = len(run.latencies_s) * len(upload.body) / 1e6 / run.wall_s
    return {
        "uploads_per_s": round(run.per_s, 2),
        "mb_per_s": round(mb_per_s),
        **percentiles(run.latencies_s),
        "cpu": cpu.per_request(len(run.latencies_s)),
    }


def open_loop_http(url: str, spec: ModelSpec, upload: HttpUpload, size: Size, rate_per_s: float) -> dict:
    load = HttpLoad(f"{url}/v1/models/{spec.name}/segment", upload.body, upload.headers, size.client_processes)
    run = load.open(rate_per_s, size.open_loop_s)
    return {"rate_per_s": round(rate_per_s, 2), "achieved_per_s": round(run.per_s, 2), **percentiles(run.latencies_s)}


def decode_ms(paths: list[Path], work: Path) -> dict:
    """What reading the study costs as the DICOM series of ``paths`` (uncompressed, and RLE Lossless and JPEG 2000
    lossless as PACS send it) and as NIfTI (``work/study.nii``), on the CPU: the series' headers parsed in a
    replica's default header processes (``reading.dicom_header_processes``), and the uncompressed one in one
    process too."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from serve_app.studies.header_processes import HeaderProcesses
    from serve_app.studies.reader import read_study

    dicom = paths[0].parent
    config = load_config()
    limits, processes = config.limits, config.reading.header_processes()
    parsers = HeaderProcesses(processes) if processes else None
    if parsers is not None:
        parsers.warm_up()
    timings = {
        "header_processes": processes,
        "dicom_series": timed_ms(lambda: read_study(dicom, limits, parsers)),
        "dicom_series_one_process": timed_ms(lambda: read_study(dicom, limits)),
    }
    for name, syntax in (("rle", RLELossless), ("jpeg2000", JPEG2000Lossless)):
        folder = work / f"dicom-{name}"
        # In processes: pylibjpeg-openjpeg's encoder crashes when threads share it. Not what is timed.
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(compress, paths, [folder] * len(paths), [syntax] * len(paths)))
        timings[f"dicom_series_{name}"] = timed_ms(lambda f=folder: read_study(f, limits, parsers), repeats=1)
    if parsers is not None:
        parsers.close()
    nifti = work / "nifti"
    nifti.mkdir()
    shutil.copy(work / "study.nii", nifti / "study")
    timings["nifti"] = timed_ms(lambda: read_study(nifti, limits))
    return timings


def zip_series(folder: Path, archive: Path) -> Path:
    """The series' files in one zip, stored uncompressed: how the DICOM phase sends them (the compressed phases
    measure compression)."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    return archive


def compress(path: Path, folder: Path, syntax: str) -> None:
    """The DICOM file ``path`` written into ``folder`` with its pixel data compressed in ``syntax``."""
    import pydicom

    folder.mkdir(exist_ok=True)
    ds = pydicom.dcmread(path)
    ds.compress(syntax)
    ds.save_as(folder / path.name)


def timed_ms(call, repeats: int = 3) -> float:
    """The median of ``repeats`` timed calls: the first pays for warming up (imports, the thread pool)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 1)


def run(
    size_name: str,
    models: list[str],
    out: Path,
    *,
    compare: tuple[str, ...],
    decode: bool = True,
    layouts: tuple = LAYOUTS,
    http_phases: tuple = HTTP_PHASES,
    fused_replicas: int = 4,
    gpus: int = 1,
    ingress_replicas: int = 8,
    throughput_optimized: bool = False,
    http_concurrencies: tuple[int, ...] = (),
    requests: int | None = None,
) -> dict:
    size = dataclasses.replace(SIZES[size_name], requests=requests or SIZES[size_name].requests)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    device_name = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores)"
    work = Path(tempfile.mkdtemp(prefix="medserve-bench-"))
    try:
        volume = study_volume(size)
        study = write_study(work / "study.nii", volume)
        repository = write_repository(work / "models", size, study)
        report = {
            "device": device_name,
            "date": datetime.date.today().isoformat(),
            "size": size_name,
            "volume": list(size.volume),
            "decode_ms": None,
            "gpus": gpus,
            "models": {},
        }
        series = write_ct_series(volume, work / "dicom")
        if decode:
            progress(report, "decode_ms", decode_ms(series, work))
        uploads = [u for u in http_uploads(study, zip_series(work / "dicom", work / "study-dicom.zip"))
                   if u.name in http_phases]  # fmt: skip
        settings = ServeSettings(
            ingress="haproxy",
            gpu_sharing=mps_if_it_runs(gpu, report),
            uploads_root=ram_backed_folder(size, work),
            fused_replicas=fused_replicas,
            gpus=gpus,
            ingress_replicas=ingress_replicas,
            throughput_optimized=throughput_optimized,
        )
        for name in models:
            spec = ModelRepository(repository).get(name)
            results = ResultStore(work / "bench-results", 1)
            in_process = Uploads(work / "uploads", uploads[0].body)
            reference_ids: list[str] = []
            reference = run_stages_in_process(
                spec, "cpu", in_process, results, size.reference_requests, 1, GpuSampler(), reference_ids
            )
            progress(None, "reference", reference)
            fidelity = Fidelity(mask_of(results, reference_ids[-1]))
            tuned, batch, engines = best_engine(spec, device, size)
            bare_ids: list[str] = []
            bare = run_stages_in_process(
                tuned, device, in_process, results, size.requests, batch, GpuSampler(), bare_ids
            )
            bare["dice_vs_reference"] = fidelity.of(results, bare_ids[-1])
            progress(None, "bare", bare)
            if gpu:
                torch.cuda.empty_cache()  # the replicas need the memory b used
            tuned_repository = write_tuned_repository(repository, tuned, work)
            served = measure_serve(
                tuned, size, work, tuned_repository, uploads, fidelity, batch, gpu, settings, layouts,
                http_concurrencies,
            )  # fmt: skip
            handles, http = served[f"handles_{served['faster_layout']}"], served["http"]
            model = report["models"][name] = {
                "model_input": list(tuned.preprocessing.spatial_size),
                "engine": tuned.engine.model_dump(include={"backend", "precision", "channels_last", "cuda_graphs"}),
                "batch_size": batch,
                "engine_volumes_per_s": engines,
                "network_only_volumes_per_s": max(engines.values(), default=None),
                "network_only_best_of": sorted(engines),
                "reference": reference,
                "bare": bare,
                **served,
                "transport_ceiling_uploads_per_s": served["transport_ceiling"]["uploads_per_s"],
                "p50_ms": {
                    "a_reference": reference["p50_ms"],
                    "b_bare": bare["p50_ms"],
                    "c_handles": handles["p50_ms"],
                    "d_http": http["p50_ms"],
                },
                # a's few requests make no p99: its figure is interpolated between them (nearly their slowest), and
                # the next field says how few they were.
                "a_reference_requests": size.reference_requests,
                "p99_ms": {
                    "a_reference": reference["p99_ms"],
                    "b_bare": bare["p99_ms"],
                    "c_handles": handles["p99_ms"],
                    "d_http": http["p99_ms"],
                },
                "ratios": {
                    "handles_over_bare": round(handles["volumes_per_s"] / bare["volumes_per_s"], 3),
                    "http_over_bare": round(http["volumes_per_s"] / bare["volumes_per_s"], 3),
                    "bare_over_reference": round(bare["volumes_per_s"] / reference["volumes_per_s"], 2),
                    "http_over_transport_ceiling": http["of_transport_ceiling"],
                },
            }
            if compare:
                model["compared_settings"] = []
                for change, alternative in alternatives(settings, compare, gpu=gpu).items():
                    try:
                        compared = measure_alternative(
                            tuned, size, work, tuned_repository, uploads, fidelity, batch, served["faster_layout"],
                            gpu, alternative,
                        )  # fmt: skip
                    except Exception as e:  # the run's other figures are still worth writing
                        compared = {"settings": alternative.label(), "error": repr(e)[:500]}
                    compared = {"change": change, **compared}
                    progress(None, f"compared {change}: {alternative.label()}", compared)
                    model["compared_settings"].append(compared)
        # The headline figures: the first model's.
        first = report["models"][models[0]]
        report.update(ratios=first["ratios"], p50_ms=first["p50_ms"], p99_ms=first["p99_ms"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if settings.uploads_root:
            shutil.rmtree(settings.uploads_root, ignore_errors=True)
    write_report(report, out)
    return report


def mps_if_it_runs(gpu: bool, report: dict) -> str:
    """mps where the MPS daemon starts on this machine, else time-slicing (the reason in the report)."""
    from serve_app import mps

    if not gpu:
        return "time-slicing"
    try:
        mps.start()
    except mps.MpsUnavailable as e:
        report["mps_unavailable"] = str(e)
        return "time-slicing"
    mps.stop()
    return "mps"


# What --compare changes, one at a time, in the chosen settings.
ALTERNATIVES = ("proxy", "time-slicing", "throughput-optimized")
# Named only: the chosen settings served again, unchanged, in a session of their own as every alternative is: the
# control that tells a setting's effect from the effect of being measured in a later session.
CONTROL = "again"
# Named only: the fused layout's replicas doubled on the GPU, each with half the share (8 x 0.125 for 4 x 0.25).
TWICE_THE_REPLICAS = "twice-the-replicas"
# What a compared session measures of the run's upload phases: d, and the DICOM series.
COMPARED_PHASES = ("http", "http_dicom_zip")


def alternatives(settings: ServeSettings, names: tuple[str, ...], *, gpu: bool) -> dict[str, ServeSettings]:
    """The chosen settings with one thing changed at a time, for each of ``names`` (``ALTERNATIVES``,
    ``TWICE_THE_REPLICAS`` and ``CONTROL``) that applies: Serve's Python proxy; time-slicing instead of MPS (where
    MPS runs); Serve's throughput-optimized data plane turned on, or off where the chosen settings have it on; twice
    the fused replicas (on a GPU); nothing changed (``CONTROL``). A compared session runs after the chosen one: the
    control measures what that order alone is worth."""
    mps = settings.gpu_sharing == "mps"
    changed = {
        "proxy": dataclasses.replace(settings, ingress="proxy"),
        "time-slicing": dataclasses.replace(settings, gpu_sharing="time-slicing") if mps else None,
        "throughput-optimized": dataclasses.replace(settings, throughput_optimized=not settings.throughput_optimized),
        TWICE_THE_REPLICAS: dataclasses.replace(settings, fused_replicas=2 * settings.fused_replicas) if gpu else None,
        CONTROL: settings,
    }
    return {name: changed[name] for name in names if changed[name] is not None}


def ram_backed_folder(size: Size, work: Path) -> Path | None:
    """A folder on /dev/shm for the spooled uploads, where it has room for two rounds of concurrent uploads."""
    shm = Path("/dev/shm")
    needed = 2 * size.concurrency * int(np.prod(size.volume)) * 2 * 4  # 4: the study, its copies, zip, decoded
    if shm.is_dir() and shutil.disk_usage(shm).free > needed:
        return shm / work.name
    return None


def write_tuned_repository(repository: Path, tuned: ModelSpec, work: Path) -> Path:
    """A repository of the one model, its model.yaml carrying the engine options the sweep chose."""
    tuned_root = work / f"models-{tuned.name}"
    shutil.copytree(repository / tuned.name, tuned_root / tuned.name)
    path = tuned_root / tuned.name / "model.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["engine"] = tuned.engine.model_dump(mode="json")
    path.write_text(yaml.safe_dump(raw))
    return tuned_root


PHASES = (
    ("reference", "a. MONAI CPU reference"),
    ("bare", "b. bare loop, one process"),
    ("handles_fused", "c. handles, fused"),
    ("handles_split", "c. handles, split"),
    ("http", "d. HTTP, raw NIfTI"),
    ("http_dicom_zip", "HTTP, zipped DICOM series"),
    ("http_nii_gz", "HTTP, .nii.gz"),
    ("http_gzip", "HTTP, raw + Content-Encoding gzip"),
    ("http_zstd", "HTTP, raw + Content-Encoding zstd"),
)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    device = report["device"].replace(" ", "_").replace("(", "").replace(")", "")
    stem = f"pipeline-{report['size']}-{'+'.join(report['models'])}-{device}-{report['date']}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Pipeline benchmark, {report['size']} size, {report['device']}, {report['date']}",
        "",
        f"Volume {report['volume']} int16; decode: {report['decode_ms']} ms.",
        "",
    ]
    for name, m in report["models"].items():
        lines += [
            f"## {name} (input {m['model_input']}, engine {m['engine']}, batch {m['batch_size']}, "
            f"faster layout: {m['faster_layout']})",
            "",
            f"Settings: {m['settings']}; network alone: {m['network_only_volumes_per_s']} volumes/s.",
            "",
            "| path | volumes/s | p50 ms | p99 ms | GPU util % | Dice vs a |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for key, label in PHASES:
            if key not in m:  # a layout left out by --layouts
                continue
            row = m[key]
            p99 = row["p99_ms"]
            if key == "reference":  # a few requests make no p99: its figure is interpolated to nearly their slowest
                p99 = f"{p99} (≈ max of {m.get('a_reference_requests', '?')})"
            lines.append(
                f"| {label} | {row['volumes_per_s']} | {row['p50_ms']} | {p99} | {row['gpu_util_percent']} "
                f"| {row.get('dice_vs_reference')} |"
            )
        r, ceiling = m["ratios"], m["transport_ceiling"]
        lines += [
            "",
            f"c/b = {r['handles_over_bare']}, d/b = {r['http_over_bare']}, b/a = {r['bare_over_reference']}, "
            f"d / transport ceiling = {r['http_over_transport_ceiling']}",
            "",
            f"Transport ceiling (same uploads, same ingress, a deployment that only receives them): {ceiling}",
            "",
            f"Open loop at 80 % of peak: handles {m['open_loop_80pct']}; HTTP {m['open_loop_http_80pct']}",
            "",
            f"Where HTTP time goes (mean ms): {m['http']['breakdown_ms']}",
            "",
        ]
        for compared in m.get("compared_settings", []):
            if "error" in compared:
                lines.append(f"- {compared['change']}: {compared['settings']}: failed: {compared['error']}")
                continue
            http, chosen = compared["http"], compared["settings"]
            dicom = compared.get("http_dicom_zip")
            lines.append(
                f"- {compared['change']}: {chosen['ingress']} + {chosen['gpu_sharing']} + throughput-optimized "
                f"{chosen['throughput_optimized']}, {chosen['model_replicas']} model replicas: "
                f"d {http['volumes_per_s']} volumes/s "
                f"(p50 {http['p50_ms']}, p99 {http['p99_ms']} ms, GPU {http['gpu_util_percent']} %, "
                f"Dice {http['dice_vs_reference']}, upload {http['breakdown_ms']['upload']} ms)"
                + (f"; DICOM {dicom['volumes_per_s']} volumes/s (Dice {dicom['dice_vs_reference']})" if dicom else "")
            )
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--models", default="msd-spleen-unet,ct-phantom-organ", help="comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: fused, split")
    parser.add_argument("--no-decode", action="store_true", help="leave out decode_ms (a minute at full size)")
    parser.add_argument(
        "--http-phases",
        default=",".join(HTTP_PHASES),
        help=f"comma-separated, d (http) first: {', '.join(HTTP_PHASES)}",
    )
    parser.add_argument(
        "--compare",
        nargs="?",
        const=",".join(ALTERNATIVES),
        default="",
        help="also serve d and the DICOM phase with one change at a time, comma-separated: proxy (Serve's Python "
        "proxy), time-slicing (where MPS runs), throughput-optimized (http.throughput_optimized switched: on, or off "
        "with --throughput-optimized); all three when none is named; twice-the-replicas (the fused replicas doubled "
        "on a GPU, each with half the share); and again (nothing changed: the control for being measured in a later "
        "session)",
    )
    parser.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="serve every phase with Serve's throughput-optimized data plane (http.throughput_optimized)",
    )
    parser.add_argument("--fused-replicas", type=int, default=4, help="fused replicas sharing the GPUs (default 4)")
    parser.add_argument(
        "--gpus", type=int, default=1, help="GPUs the fused replicas spread over (a divisor of --fused-replicas)"
    )
    parser.add_argument(
        "--http-concurrency",
        default="",
        help="comma-separated: d (raw NIfTI over HTTP) again at each of these concurrencies, after the upload phases",
    )
    parser.add_argument("--ingress-replicas", type=int, default=8, help="ingress replicas on a GPU node (default 8)")
    parser.add_argument("--requests", type=int, help="requests in each closed-loop phase (the size's own by default)")
    args = parser.parse_args(argv)
    run(
        args.size,
        args.models.split(","),
        args.out,
        compare=_alternative_names(args.compare),
        decode=not args.no_decode,
        layouts=tuple(args.layouts.split(",")),
        http_phases=tuple(args.http_phases.split(",")),
        fused_replicas=args.fused_replicas,
        gpus=args.gpus,
        http_concurrencies=tuple(int(c) for c in args.http_concurrency.split(",") if c),
        requests=args.requests,
        ingress_replicas=args.ingress_replicas,
        throughput_optimized=args.throughput_optimized,
    )


def _alternative_names(listed: str) -> tuple[str, ...]:
    names = tuple(name for name in listed.split(",") if name)
    known = (*ALTERNATIVES, TWICE_THE_REPLICAS, CONTROL)
    if unknown := sorted(set(names) - set(known)):
        raise SystemExit(f"--compare: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


if __name__ == "__main__":
    main()
