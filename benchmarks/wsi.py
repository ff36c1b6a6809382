"""WSI throughput, three ways on one generated slide and one ResNet-18-class tile model (224 px, fp16 on a GPU):

1. model only: random tiles already in memory, the best of several batch sizes;
2. medserve end to end: a real WSI job on a local Ray cluster and Serve (open, tissue, read, decode,
   inference, write), tiles/s over the job's wall time;
3. naive: one process reads one tile, runs the model on it, and goes on to the next.

    python -m benchmarks.wsi --size small             # this CPU machine: a smoke run of a minute
    python -m benchmarks.wsi --size large --out DIR   # the GPU machine (benchmarks/wsi_gpu_session.sh)
    python -m benchmarks.wsi --size cpu-fixed --network tiny --scaling 1 --slides 3   # a job's fixed costs, on CPU

Writes ``wsi-<device>-<date>.json`` (``wsi.tiles_per_s``, ``wsi.model_only_tiles_per_s``,
``wsi.naive_tiles_per_s``) and a Markdown table beside it. Absolute figures mean something only from the
GPU machine; on a CPU compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.http_load import wait_until_ready
from serve_app.engines.devices import replica_device
from serve_app.model_spec import read_model_spec
from serve_app.samples.synthetic_slides import write_slide_from_region
from serve_app.samples.synthetic_tissue import make_slide_canvas
from serve_app.wsi.tile_classifier import TileClassifier

MODEL = "bench-resnet18"


@dataclass(frozen=True)
class Size:
    side: int  # slide pixels each way, level 0 at 0.5 mpp
    naive_tiles: int
    replicas: int
    gpu_share: float  # of one GPU, per replica
    cpus_per_replica: float
    read_threads: int
    chunk_tiles: int
    chunks_in_flight: int


SIZES = {
    "small": Size(4096, 40, 1, 0.0, 0.5, 2, 8, 4),
    # A slide large enough for its fixed costs (open, tissue, outputs) to show, for a CPU run with --network tiny.
    "cpu-fixed": Size(16_384, 40, 1, 0.0, 0.5, 2, 16, 8),
    "large": Size(60_000, 2000, 8, 0.125, 1.5, 4, 16, 64),
}


# The tile network: ResNet-18, the benchmark's; or a ResNet of one block a stage and an eighth of the channels, which
# a CPU runs fast enough for a job's fixed costs (driver, open, tissue, outputs) to show beside its units.
NETWORKS = {
    "resnet18": {"layers": [2, 2, 2, 2], "block_inplanes": [64, 128, 256, 512]},
    "tiny": {"layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64]},
}


def write_bench_model(folder: Path, network: str = "resnet18") -> Path:
    """A MONAI ResNet (2D; ``NETWORKS``) tile classifier with random weights, as a model repository of one model."""
    from monai.networks.nets import ResNet

    args = {
        "block": "basic",
        **NETWORKS[network],
        "spatial_dims": 2,
        "n_input_channels": 3,
        "num_classes": 2,
        "conv1_t_size": 7,
        "conv1_t_stride": 2,
    }
    model_folder = folder / MODEL
    model_folder.mkdir(parents=True)
    torch.save(ResNet(**args).state_dict(), model_folder / "model.pt")
    spec = {
        "name": MODEL,
        "version": "0+bench",
        "task": "tile_classification",
        "modality": "SM",
        "labels": {0: "normal", 1: "tumour"},
        "preprocessing": {"mpp": 0.5, "tile_size": 224, "mean": [0.65, 0.5, 0.62], "std": [0.27, 0.27, 0.23]},
        "network": {"name": "ResNet", "args": args},
        "weights": {"file": "model.pt", "format": "monai_state_dict"},
        "engine": {"precision": "fp16", "channels_last": True, "batch_sizes": [64, 128, 256]},
    }
    (model_folder / "model.yaml").write_text(yaml.safe_dump(spec))
    return folder


def write_bench_slide(path: Path, side: int) -> float:
    """A side x side slide of synthetic H&E mirrored (tissue everywhere: every tile is classified)."""
    watch = time.perf_counter()
    canvas = make_slide_canvas(2048, 2048, mpp=0.5, seed=1, tissue_fraction=1.0, tumour_fraction=0.5)
    write_slide_from_region(path, side, side, region=canvas.render(0, 0, 2048, 2048, 0.5), quality=80)
    return time.perf_counter() - watch


def model_only(classifier: TileClassifier) -> dict:
    """Tiles/s of the engine alone on device-resident random tensors, per batch size."""
    device = classifier.device
    rates = {}
    for batch in (64, 128, 256):
        x = torch.rand((batch, 3, 224, 224), device=device)
        for _ in range(3):
            classifier.engine(x)
        _sync(device)
        runs = 20 if device.type == "cuda" else 2
        watch = time.perf_counter()
        for _ in range(runs):
            classifier.engine(x)
        _sync(device)
        rates[batch] = round(runs * batch / (time.perf_counter() - watch), 1)
    return rates


def naive(classifier: TileClassifier, slide_path: Path, tiles: int) -> float:
    """Tiles/s of read one tile, classify it, next: no batching, no overlap."""
    from serve_app.wsi.slides import open_slide

    with open_slide(slide_path) as slide:
        classifier(slide.read_region(0, 0, 0, 224, 224)[None])  # warm-up
        across = slide.levels[0].width // 224
        watch = time.perf_counter()
        for i in range(tiles):
            x, y = (i % across) * 224, (i // across) * 224
            classifier(slide.read_region(0, x, y, 224, 224)[None])
        return tiles / (time.perf_counter() - watch)


class GpuSampler:
    """NVML utilisation of GPU 0, sampled every 0.2 s while it runs."""

    def __init__(self):
        self.samples: list[int] = []
        self._stop = threading.Event()

    def __enter__(self) -> GpuSampler:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            return self  # no NVML: no samples
        self._thread = threading.Thread(target=self._run, args=(pynvml, handle), daemon=True)
        self._thread.start()
        return self

    def _run(self, pynvml, handle) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def __exit__(self, *exc_info) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def end_to_end(
    repository: Path,
    slide_path: Path,
    size: Size,
    work: Path,
    *,
    gpu_decode: bool,
    gpus: int = 1,
    slides: int = 1,
    gpu_jpeg_decoder: str = "torchvision",
) -> dict:
    """A real WSI job on a local Ray cluster: submitted over HTTP, timed from submission to its end. ``slides``
    copies of the slide in the one job; the size's tile-model replicas on each of ``gpus`` GPUs."""
    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import load_config

    port = _free_port()
    tile_model = {
        "num_replicas": size.replicas * gpus,
        "num_cpus": size.cpus_per_replica,
        "num_gpus": size.gpu_share,
        "max_ongoing_requests": 6,
    }
    config = load_config(
        overrides={
            "name": "bench-wsi",
            "model_repository": str(repository),
            "http.port": port,
            "storage.root": str(work / "storage"),
            "wsi.slide_roots": [str(slide_path.parent)],
            "wsi.output_root": str(work / f"wsi-{gpu_decode}-{gpu_jpeg_decoder}"),
            "wsi.chunk_tiles": size.chunk_tiles,
            "wsi.chunks_in_flight": size.chunks_in_flight,
            "wsi.read_threads": size.read_threads,
            "wsi.gpu_decode": gpu_decode,
            "wsi.gpu_jpeg_decoder": gpu_jpeg_decoder,
            "deployments.tile_model": tile_model,
        }
    )
    ray.init(logging_level="ERROR", configure_logging=False, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=config.name, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, timeout_s=300)
        copies = [slide_path] + [_linked_copy(slide_path, i) for i in range(1, slides)]
        with httpx.Client(base_url=url, timeout=60) as client:
            # A first job warms the replicas (engines built, cuDNN tuned); the second is timed.
            for out, job_slides in (("warm-up", [slide_path]), ("timed", copies)):
                with GpuSampler() as gpu:
                    watch = time.perf_counter()
                    job = client.post(
                        "/v1/wsi/jobs", json={"model": MODEL, "slides": [str(p) for p in job_slides], "out": out}
                    )
                    job.raise_for_status()
                    # When the job was first seen running (its driver took it), with its first slide planned (opened,
                    # tissue found: units sent) and with every tile classified (then only the outputs are left).
                    marks: dict[str, float] = {}
                    while (status := client.get(f"/v1/wsi/jobs/{job.json()['job_id']}").json())["state"] in (
                        "queued",
                        "running",
                    ):
                        seen = {
                            "running": status["state"] == "running",
                            "planned": status["tiles_total"] > 0,
                            "classified": all(
                                s["tiles_total"] is not None or s["state"] == "failed" for s in status["slides"]
                            )
                            and status["tiles_done"] >= status["tiles_total"] > 0,
                        }
                        for mark in (mark for mark, now in seen.items() if now and mark not in marks):
                            marks[mark] = round(time.perf_counter() - watch, 2)
                        time.sleep(0.05)
                    wall_s = time.perf_counter() - watch
        summary = status["slides"][0]["summary"]
        if status["state"] != "done" or any(slide["summary"] is None for slide in status["slides"]):
            raise RuntimeError(f"the benchmark job ended {status['state']}: {status['slides'][0]['error']}")
        tiles = sum(slide["summary"]["tiles_tissue"] for slide in status["slides"])
        steady = [
            round(slide["summary"]["tiles_tissue"] / slide["summary"]["classify_wall_s"], 1)
            for slide in status["slides"]
        ]
        return {
            "tiles": tiles,
            "slides": slides,
            "gpus": gpus,
            "wall_s": round(wall_s, 2),
            # Seconds from submission (polled every 0.05 s): the job running on its driver, its first slide's units
            # sent, its last unit written; the rest of wall_s is the outputs after the last unit.
            "running_after_s": marks.get("running"),
            "first_units_after_s": marks.get("planned"),
            "last_unit_after_s": marks.get("classified"),
            "after_last_unit_s": round(wall_s - marks["classified"], 2) if "classified" in marks else None,
            "tiles_per_s": round(tiles / wall_s, 1),
            # Each slide's units only: from the first sent to the last written, without the job's start,
            # planning (open, tissue) and the renderings at its end; the median over the job's slides.
            "classify_wall_s": [slide["summary"]["classify_wall_s"] for slide in status["slides"]],
            "steady_tiles_per_s": round(float(np.median(steady)), 1),
            "steady_tiles_per_s_by_slide": steady,
            "gpu_utilisation_pct": gpu.mean,
            # Summed over every slide of the job, as over each slide's work units.
            "phase_seconds": {
                phase: round(sum(slide["summary"]["seconds"][phase] for slide in status["slides"]), 2)
                for phase in summary["seconds"]
            },
            "reader": summary["reader"],
            "replicas": size.replicas * gpus,
            "gpu_per_replica": size.gpu_share,
            "jpeg_decode": f"GPU ({gpu_jpeg_decoder})" if gpu_decode else "CPU threads",
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def _linked_copy(slide_path: Path, index: int) -> Path:
    """Another name for the slide (a hard link: no copy of its bytes), so a job may hold it several times."""
    copy = slide_path.with_name(f"{slide_path.stem}-{index}{slide_path.suffix}")
    if not copy.exists():  # an earlier end-to-end run of this benchmark made it
        copy.hardlink_to(slide_path)
    return copy


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wsi", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--scaling",
        type=int,
        metavar="GPUS",
        help="only the end-to-end job (GPU decode where there is one), the tile-model replicas on GPUS GPUs, "
        "--slides slides at once; writes wsi-scaling-<GPUS>.json (benchmarks/gpu_scaling.sh)",
    )
    parser.add_argument("--slides", type=int, default=1, help="slides in the end-to-end job (copies of one)")
    parser.add_argument(
        "--gpu-decoders",
        default="torchvision",
        help="comma-separated wsi.gpu_jpeg_decoder values, one end-to-end job each on a GPU (default torchvision)",
    )
    parser.add_argument(
        "--network",
        choices=sorted(NETWORKS),
        default="resnet18",
        help="the tile network: resnet18 (the benchmark's), or tiny, for a CPU run where a job's fixed costs show",
    )
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    work = Path(tempfile.mkdtemp(prefix="bench-wsi-"))
    repository = write_bench_model(work / "models", args.network)
    slide_path = work / "slides" / "bench.tiff"
    slide_path.parent.mkdir()
    write_s = write_bench_slide(slide_path, size.side)
    print(f"slide {size.side} x {size.side} written in {write_s:.1f} s", flush=True)

    device = replica_device()
    if args.scaling:
        gpu_decode = device.type == "cuda"
        run = end_to_end(
            repository, slide_path, size, work, gpu_decode=gpu_decode, gpus=args.scaling, slides=args.slides
        )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"wsi-scaling-{args.scaling}.json").write_text(json.dumps(run, indent=1))
        print(json.dumps(run), flush=True)
        return
    spec = read_model_spec(repository / MODEL / "model.yaml")
    classifier = TileClassifier(spec, device)
    model_rates = model_only(classifier)
    print(f"model only, tiles/s by batch: {model_rates}", flush=True)
    # The naive loop's engine takes batches of one: padded to 64 it would do 64 times the work.
    one_by_one = spec.model_copy(update={"engine": spec.engine.model_copy(update={"batch_sizes": (1,)})})
    naive_rate = naive(TileClassifier(one_by_one, device), slide_path, size.naive_tiles)
    print(f"naive loop: {naive_rate:.1f} tiles/s", flush=True)
    del classifier
    torch.cuda.empty_cache() if device.type == "cuda" else None
    runs = [end_to_end(repository, slide_path, size, work, gpu_decode=False, slides=args.slides)]
    if device.type == "cuda":
        runs += [
            end_to_end(repository, slide_path, size, work, gpu_decode=True, slides=args.slides, gpu_jpeg_decoder=name)
            for name in args.gpu_decoders.split(",")
        ]
    for run in runs:
        print(f"medserve end to end, {run['jpeg_decode']} decode: {run['tiles_per_s']:.0f} tiles/s", flush=True)
    job = max(runs, key=lambda run: run["tiles_per_s"])

    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU {platform.processor() or 'x86_64'}"
    date = datetime.now(UTC).date().isoformat()
    result = {
        "device": device_name,
        "date": date,
        "size": args.size,
        "slide": {"side_px": size.side, "mpp": 0.5, "tile_px": 256, "compression": "jpeg q80", "write_s": write_s},
        "model": "MONAI ResNet-18 (2D), 224 px, " + ("fp16 channels-last" if device.type == "cuda" else "fp32 CPU"),
        "wsi": {
            # Headlines that are the best of several variants say so: of the decode paths run, of the batch sizes.
            "tiles_per_s": job["tiles_per_s"],
            "tiles_per_s_best_of": [run["jpeg_decode"] for run in runs],
            "model_only_tiles_per_s": max(model_rates.values()),
            "model_only_best_of_batches": sorted(model_rates),
            "model_only_by_batch": model_rates,
            "naive_tiles_per_s": round(naive_rate, 1),
            "end_to_end": job,
            "end_to_end_runs": runs,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"wsi-{device_name.replace(' ', '_')}-{date}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(_table(result))
    print(_table(result))


def _table(result: dict) -> str:
    wsi = result["wsi"]
    job = wsi["end_to_end"]
    rows = [
        ("model only (random tiles, best batch)", wsi["model_only_tiles_per_s"]),
        *(
            (f"medserve end to end, JPEG decode on {run['jpeg_decode']} (job wall time)", run["tiles_per_s"])
            for run in wsi["end_to_end_runs"]
        ),
        ("naive loop (read one, classify one)", wsi["naive_tiles_per_s"]),
    ]
    lines = [
        f"WSI benchmark on {result['device']}, {result['date']}: {result['model']}, "
        f"{result['slide']['side_px']}² px slide, {job['tiles']} tissue tiles",
        "",
        "| path | tiles/s | vs model only |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {rate:,.0f} | {rate / wsi['model_only_tiles_per_s']:.2f} |" for name, rate in rows),
        "",
        *(
            f"End to end, {run['jpeg_decode']}: {run['wall_s']:.1f} s for the job, of which "
            f"{max(run['classify_wall_s']):.1f} s classifying its slowest slide's units (median slide "
            f"{run['steady_tiles_per_s']:,.0f} tiles/s); "
            "GPU utilisation "
            f"{run['gpu_utilisation_pct']} %; running on its driver {run['running_after_s']} s after submission, "
            f"first units sent after {run['first_units_after_s']} s, {run['after_last_unit_s']} s from the last unit "
            "to the job's end; phase seconds (summed over every slide's work units, which overlap): "
            f"{run['phase_seconds']}"
            for run in wsi["end_to_end_runs"]
        ),
    ]
    return "\n".join(lines) + "\n"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
