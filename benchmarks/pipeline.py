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
import datetime
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

from serve_app.config import EMBEDDED_MODEL_REPOSITORY, AppConfig, LimitsConfig, load_config
from serve_app.model_repository import EngineSpec, ModelRepository, ModelSpec, read_model_spec
from serve_app.results import ResultStore
from serve_app.segmentation.stages import Postprocessor, Predictor, Preprocessor
from serve_app.segmentation.transforms import to_model_input
from serve_app.studies.nifti import read_nifti
from serve_app.studies.phantoms import ct_phantom

RESULTS = Path(__file__).with_name("results")
METRICS_PORT = 18700  # Ray's metrics agent, for scraping replica metrics during a run (gpu_session.sh)


@dataclass(frozen=True)
class Size:
    volume: tuple[int, int, int]
    spacing: tuple[float, float, float]
    model_input: tuple[int, int, int]  # the MSD-spleen UNet's input (224^3 in the tutorial)
    requests: int  # per measured phase
    concurrency: int
    reference_requests: int
    open_loop_s: float


SIZES = {
    "tiny": Size((96, 96, 32), (3.6, 3.6, 6.0), (48, 48, 48), 6, 2, 2, 3.0),
    "small": Size((256, 256, 96), (1.4, 1.4, 3.0), (96, 96, 96), 16, 4, 3, 10.0),
    "full": Size((512, 512, 300), (0.8, 0.8, 1.0), (224, 224, 224), 48, 16, 2, 20.0),
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
                "version": "bench",
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


def write_study(path: Path, size: Size) -> Path:
    """A CT-like int16 volume as one uncompressed NIfTI: reading it costs little, so the figures
    are the pipeline's, not pydicom's (DICOM decoding is timed separately in `decode_ms`)."""
    phantom = ct_phantom(np.random.default_rng(0), shape=size.volume, spacing=size.spacing)
    array = np.clip(np.rint(phantom.volume.array), -1024, 3071).astype(np.int16)
    nib.save(nib.Nifti1Image(array, phantom.volume.affine), str(path))
    return path


def with_engine(spec: ModelSpec, **options) -> ModelSpec:
    return spec.model_copy(update={"engine": EngineSpec(**{**spec.engine.model_dump(), **options})})


class GpuSampler:
    """Mean GPU utilisation over a phase, from NVML; None without a GPU."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self._nvml = None
        self.samples: list[float] = []

    def __enter__(self):
        self.samples, self._stop = [], threading.Event()
        if self._nvml:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.1):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self):
        return round(statistics.fmean(self.samples), 1) if self.samples else None


def percentiles(latencies_s: list[float]) -> dict:
    ms = [x * 1000 for x in latencies_s]
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def summarise(latencies_s: list[float], wall_s: float, gpu: GpuSampler, **extra) -> dict:
    return {
        "volumes_per_s": round(len(latencies_s) / wall_s, 3),
        **percentiles(latencies_s),
        "requests": len(latencies_s),
        "gpu_util_percent": gpu.mean,
        **extra,
    }


class Uploads:
    """Fresh upload folders holding the study, as the ingress spools them (hard links: no copy cost)."""

    def __init__(self, root: Path, study: Path):
        self.root, self.study = root, study
        root.mkdir(parents=True, exist_ok=True)

    def new(self) -> Path:
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        os.link(self.study, folder / "study")
        return folder


def run_stages_in_process(
    spec: ModelSpec, device: str, uploads: Uploads, results: ResultStore, requests: int, batch: int, gpu: GpuSampler
) -> dict:
    """a (CPU) and b (GPU): the stage objects medserve's replicas use, called in one process."""
    preprocessor = Preprocessor(load_config().limits, torch.device(device))
    predictor = Predictor(spec, torch.device(device))
    postprocessor = Postprocessor(results)

    def pre(_):
        return preprocessor(uploads.new(), spec)

    def post(args):
        logits, prepared = args
        return postprocessor(logits, prepared.model_affine, prepared.grid, spec, uuid.uuid4().hex)

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


def serve_config(
    storage: Path, repository: Path, study: Path, layout: str, gpu: bool, batch: int, port: int
) -> AppConfig:
    """4 x 0.25 GPU fused replicas, or the GPU shared by split stages; the study is linked into storage."""
    storage.mkdir(parents=True, exist_ok=True)
    if not (storage / "study").exists():
        os.link(study, storage / "study")
    if gpu and layout == "fused":
        deployments = {"model": {"num_replicas": 4, "num_gpus": 0.25, "num_cpus": 1, "max_ongoing_requests": 16}}
    elif gpu:
        deployments = {
            "preprocess": {"num_replicas": 2, "num_gpus": 0.125, "num_cpus": 1},
            "model": {"num_replicas": 2, "num_gpus": 0.25, "num_cpus": 1, "max_ongoing_requests": 16},
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
            "deployments": {**deployments, "ingress": {"num_replicas": 2 if gpu else 1, "num_cpus": 0.5}},
            "storage": {"root": storage},
            "http": {"port": port},
        }
    )


async def closed_loop(call, requests: int, concurrency: int) -> tuple[list[float], float, list]:
    latencies, outcomes, queue = [], [], asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker():
        while not queue.empty():
            queue.get_nowait()
            t0 = time.perf_counter()
            outcomes.append(await call())
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start, outcomes


async def open_loop(call, rate_per_s: float, duration_s: float) -> list[float]:
    """Requests at a fixed rate whatever the answers do: the latency a steady load sees."""
    latencies = []

    async def one():
        t0 = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - t0)

    tasks, start = [], time.perf_counter()
    for i in range(max(int(rate_per_s * duration_s), 4)):
        await asyncio.sleep(max(start + i / rate_per_s - time.perf_counter(), 0))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return latencies


def breakdown(timings: list[dict]) -> dict:
    return {k: round(statistics.fmean(t[k] for t in timings) * 1000, 1) for k in timings[0]}


def measure_serve(
    spec: ModelSpec, size: Size, work: Path, repository: Path, study: Path, batch: int, gpu: bool
) -> dict:
    """c for both layouts through DeploymentHandles; then, on the faster one, d and the open-loop run."""
    import ray
    from ray import serve

    ray.init(
        address="local",
        include_dashboard=False,
        logging_level="ERROR",
        num_cpus=max(os.cpu_count() or 2, 4),
        _metrics_export_port=METRICS_PORT,
    )
    port = 18600
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    out = {}
    try:
        for layout in ("fused", "split"):
            with deployed(
                serve_config(work / f"storage-{layout}", repository, study, layout, gpu, batch, port)
            ) as call:
                asyncio.run(closed_loop(call, size.concurrency, size.concurrency))  # warm-up
                with GpuSampler() as gpu_sampler:
                    latencies, wall, outcomes = asyncio.run(closed_loop(call, size.requests, size.concurrency))
                out[f"handles_{layout}"] = summarise(
                    latencies, wall, gpu_sampler, breakdown_ms=breakdown([o.timings.model_dump() for o in outcomes])
                )
        faster = max(("fused", "split"), key=lambda k: out[f"handles_{k}"]["volumes_per_s"])
        config = serve_config(work / f"storage-{faster}", repository, study, faster, gpu, batch, port)
        with deployed(config) as call:
            asyncio.run(closed_loop(call, size.concurrency, size.concurrency))  # warm-up, as for c
            rate = 0.8 * out[f"handles_{faster}"]["volumes_per_s"]
            steady = asyncio.run(open_loop(call, rate, size.open_loop_s))
            out["open_loop_80pct"] = {"layout": faster, "rate_per_s": round(rate, 2), **percentiles(steady)}
            out["http"] = measure_http(f"http://127.0.0.1:{port}/{config.name}", spec, study, size)
        out["faster_layout"] = faster
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


@contextlib.contextmanager
def deployed(config: AppConfig):
    """The application deployed at /<name>; yields an async call that sends one study through its handles."""
    from ray import serve

    from serve_app.app import build_app
    from serve_app.segmentation.stage_handles import StageHandles

    serve.run(build_app(config), name=config.name, route_prefix=f"/{config.name}", blocking=False)
    (model_name,) = [m.name for m in ModelRepository(config.model_repository)]
    handle = lambda deployment: serve.get_deployment_handle(deployment, config.name)  # noqa: E731
    if config.fused:
        stages = StageHandles({model_name: handle(f"FusedPipeline:{model_name}")})
    else:
        stages = StageHandles(
            {model_name: handle(f"ModelReplica:{model_name}")}, handle("Preprocess"), handle("Postprocess")
        )
    uploads = Uploads(config.storage.uploads, config.storage.root / "study")

    async def call():
        return await stages.segment(model_name, uploads.new(), uuid.uuid4().hex)

    try:
        yield call
    finally:
        serve.delete(config.name)


def measure_http(url: str, spec: ModelSpec, study: Path, size: Size) -> dict:
    import httpx

    body = study.read_bytes()

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:

            async def call():
                response = await client.post(
                    f"/v1/models/{spec.name}/segment",
                    content=body,
                    headers={"content-type": "application/octet-stream"},
                )
                response.raise_for_status()
                return response.json()["timings_ms"]

            await closed_loop(call, size.concurrency, size.concurrency)
            with GpuSampler() as gpu:
                latencies, wall, timings = await closed_loop(call, size.requests, size.concurrency)
            return summarise(
                latencies,
                wall,
                gpu,
                breakdown_ms={k: round(statistics.fmean(t[k] for t in timings), 1) for k in timings[0]},
                upload_mb=round(len(body) / 1e6, 1),
            )

    return asyncio.run(run())


def decode_ms(size: Size, work: Path) -> dict:
    """What reading the same volume costs as a DICOM series (uncompressed, RLE Lossless and JPEG 2000 lossless, as
    PACS send it) and as NIfTI, on the CPU."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from serve_app.studies.reader import read_study
    from serve_app.studies.sample_data import write_ct_series

    phantom = ct_phantom(np.random.default_rng(1), shape=size.volume, spacing=size.spacing)
    dicom = work / "dicom"
    paths = write_ct_series(phantom.volume, dicom)
    limits = load_config().limits
    timings = {"dicom_series": timed_ms(lambda: read_study(dicom, limits))}
    for name, syntax in (("rle", RLELossless), ("jpeg2000", JPEG2000Lossless)):
        folder = work / f"dicom-{name}"
        # In processes: pylibjpeg-openjpeg's encoder crashes when threads share it. Not what is timed.
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(compress, paths, [folder] * len(paths), [syntax] * len(paths)))
        timings[f"dicom_series_{name}"] = timed_ms(lambda f=folder: read_study(f, limits))
    nifti = work / "nifti"
    nifti.mkdir()
    shutil.copy(work / "study.nii", nifti / "study")
    timings["nifti"] = timed_ms(lambda: read_study(nifti, limits))
    return timings


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


def run(size_name: str, models: list[str], out: Path) -> dict:
    size = SIZES[size_name]
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    device_name = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores)"
    work = Path(tempfile.mkdtemp(prefix="medserve-bench-"))
    try:
        study = write_study(work / "study.nii", size)
        repository = write_repository(work / "models", size, study)
        report = {
            "device": device_name,
            "date": datetime.date.today().isoformat(),
            "size": size_name,
            "volume": list(size.volume),
            "decode_ms": decode_ms(size, work),
            "models": {},
        }
        for name in models:
            spec = ModelRepository(repository).get(name)
            results = ResultStore(work / "bench-results", 1)
            uploads = Uploads(work / "uploads", study)
            reference = run_stages_in_process(spec, "cpu", uploads, results, size.reference_requests, 1, GpuSampler())
            tuned, batch, engines = best_engine(spec, device, size)
            bare = run_stages_in_process(tuned, device, uploads, results, size.requests, batch, GpuSampler())
            served = measure_serve(
                tuned, size, work, write_tuned_repository(repository, tuned, work), study, batch, gpu
            )
            handles, http = served[f"handles_{served['faster_layout']}"], served["http"]
            report["models"][name] = {
                "model_input": list(tuned.preprocessing.spatial_size),
                "engine": tuned.engine.model_dump(include={"backend", "precision", "channels_last", "cuda_graphs"}),
                "batch_size": batch,
                "engine_volumes_per_s": engines,
                "reference": reference,
                "bare": bare,
                **served,
                "p50_ms": {
                    "a_reference": reference["p50_ms"],
                    "b_bare": bare["p50_ms"],
                    "c_handles": handles["p50_ms"],
                    "d_http": http["p50_ms"],
                },
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
                },
            }
        # The headline figures: the first model's.
        first = report["models"][models[0]]
        report.update(ratios=first["ratios"], p50_ms=first["p50_ms"], p99_ms=first["p99_ms"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(report, out)
    return report


def write_tuned_repository(repository: Path, tuned: ModelSpec, work: Path) -> Path:
    """A repository of the one model, its model.yaml carrying the engine options the sweep chose."""
    tuned_root = work / f"models-{tuned.name}"
    shutil.copytree(repository / tuned.name, tuned_root / tuned.name)
    path = tuned_root / tuned.name / "model.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["engine"] = tuned.engine.model_dump(mode="json")
    path.write_text(yaml.safe_dump(raw))
    return tuned_root


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
            "| path | volumes/s | p50 ms | p99 ms | GPU util % |",
            "| --- | --- | --- | --- | --- |",
        ]
        for key, label in (
            ("reference", "a. MONAI CPU reference"),
            ("bare", "b. bare loop, one process"),
            ("handles_fused", "c. handles, fused"),
            ("handles_split", "c. handles, split"),
            ("http", "d. HTTP"),
        ):
            row = m[key]
            lines.append(
                f"| {label} | {row['volumes_per_s']} | {row['p50_ms']} | {row['p99_ms']} | {row['gpu_util_percent']} |"
            )
        r = m["ratios"]
        lines += [
            "",
            f"c/b = {r['handles_over_bare']}, d/b = {r['http_over_bare']}, b/a = {r['bare_over_reference']}; "
            f"open loop at 80 % of peak: {m['open_loop_80pct']}",
            "",
            f"Where HTTP time goes (mean ms): {m['http']['breakdown_ms']}",
            "",
        ]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--models", default="msd-spleen-unet,ct-phantom-organ", help="comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run(args.size, args.models.split(","), args.out)


if __name__ == "__main__":
    main()
