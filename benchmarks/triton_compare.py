"""medserve and Triton side by side: the same UNet, the same volume, the same protocol, client and load, one run.

  a. triton   - NVIDIA Triton Inference Server through PyTriton (``nvidia-pytriton``), the model's whole GPU
                pipeline inside the bound callable as a Triton user writes it: MONAI preprocessing on the GPU, the
                network (the same engine options), medserve's postprocessing (``mask_on_grid``) on the GPU; as many
                instances as medserve has replicas, dynamic batching up to the same batch size and delay
  b. medserve - medserve's fused layout (as many replicas, HAProxy ingress) through its Open Inference Protocol
                routes, which also keep each result (mask file, summary) as a study's

Both are loaded by NVIDIA's ``tritonclient`` from client processes (a closed loop of ``--concurrency``), over HTTP with
binary tensors and over gRPC where the server speaks it. Reported per system and protocol: volumes/s, p50/p99, GPU
utilisation, and the ratio medserve / Triton; the masks of the two are compared voxel for voxel.

    python -m benchmarks.triton_compare --size full --concurrency 8   # the GPU machine, with nvidia-pytriton

Writes benchmarks/results/triton-compare-<size>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.pipeline import (
    RESULTS,
    SIZES,
    GpuSampler,
    ServeSettings,
    free_port,
    percentiles,
    ram_backed_folder,
    serve_config,
    serving,
    study_volume,
    with_engine,
    write_repository,
    write_study,
    write_tuned_repository,
)
from serve_app.model_spec import ModelSpec, read_model_spec
from serve_app.segmentation.stages import Predictor
from serve_app.segmentation.transforms import label_volumes_ml, mask_on_grid, to_model_input
from serve_app.studies.volume import Volume, voxel_volume_ml

MODEL = "msd-spleen-unet"
ENGINE = {"precision": "fp16", "channels_last": True, "cuda_graphs": True}  # the pipeline sweep's winner on H100/H200
BATCH_WAIT_S = 0.02  # medserve's batch_wait_timeout_s and Triton's max_queue_delay, alike
OUTPUTS = ("MASK", "LABEL_VOLUMES_ML")


@dataclass(frozen=True)
class Target:
    """One server under load: which system, which protocol, where, and how its requests are shaped."""

    system: str  # "triton" or "medserve"
    protocol: str  # "http" or "grpc"
    url: str  # host:port as tritonclient takes it
    volume_npy: str  # the volume (I, J, K) int16, memory-mapped by each client process
    affine: tuple  # 4x4, row by row
    batched_affine: bool  # Triton's batching model takes AFFINE as [1, 4, 4]; medserve's route as [4, 4]
    headers: tuple = ()  # e.g. gRPC metadata naming medserve's application


def _client(target: Target):
    if target.protocol == "grpc":
        import tritonclient.grpc as triton

        return triton, triton.InferenceServerClient(target.url)
    import tritonclient.http as triton

    return triton, triton.InferenceServerClient(
        target.url, connection_timeout=600.0, network_timeout=600.0, concurrency=1
    )


def _infer_once(triton, client, target: Target, voxels: np.ndarray, affine: np.ndarray):
    binary = {"binary_data": True} if target.protocol == "http" else {}
    image = triton.InferInput("IMAGE", [1, *voxels.shape], "INT16")
    image.set_data_from_numpy(voxels[np.newaxis], **binary)
    affine = affine[np.newaxis] if target.batched_affine else affine
    matrix = triton.InferInput("AFFINE", list(affine.shape), "FP64")
    matrix.set_data_from_numpy(affine, **binary)
    outputs = [triton.InferRequestedOutput(name, **binary) for name in OUTPUTS]
    return client.infer(MODEL, [image, matrix], outputs=outputs, headers=dict(target.headers) or None)


def client_loop(target: Target, requests: int, start_at: float) -> tuple[list[tuple[float, float]], str | None]:
    """One client process: a warm-up request, then (from ``start_at``, so that every process's clock starts together)
    ``requests`` in a row; each request's (start, end) epoch seconds, and the first error's text if one failed."""
    triton, client = _client(target)
    voxels = np.load(target.volume_npy, mmap_mode="r")
    voxels = np.ascontiguousarray(voxels)
    affine = np.asarray(target.affine, dtype=np.float64).reshape(4, 4)
    spans: list[tuple[float, float]] = []
    try:
        _infer_once(triton, client, target, voxels, affine)
        time.sleep(max(start_at - time.time(), 0.0))
        for _ in range(requests):
            t0 = time.time()
            _infer_once(triton, client, target, voxels, affine)
            spans.append((t0, time.time()))
    except Exception as error:  # a server's refusal is a figure of the run, not its end
        return spans, f"{type(error).__name__}: {str(error)[:500]}"
    finally:
        client.close()
    return spans, None


def first_mask(target: Target) -> np.ndarray:
    triton, client = _client(target)
    try:
        voxels = np.ascontiguousarray(np.load(target.volume_npy))
        result = _infer_once(triton, client, target, voxels, np.asarray(target.affine).reshape(4, 4))
        return result.as_numpy("MASK")[0]
    finally:
        client.close()


def load(target: Target, requests: int, concurrency: int) -> dict:
    """``requests`` over ``concurrency`` client processes, all timed from one start."""
    per_client = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    start_at = time.time() + 15.0  # after every process's import and warm-up request
    context = multiprocessing.get_context("spawn")
    with GpuSampler() as gpu, ProcessPoolExecutor(concurrency, mp_context=context) as pool:
        futures = [pool.submit(client_loop, target, n, start_at) for n in per_client]
        outcomes = [f.result() for f in futures]
    spans = [span for got, _ in outcomes for span in got]
    errors = sorted({error for _, error in outcomes if error})
    if not spans:
        return {"error": errors[0] if errors else "no request finished"}
    begin, end = min(s for s, _ in spans), max(e for _, e in spans)
    gpu.window = (begin, end)
    figures = {
        "volumes_per_s": round(len(spans) / (end - begin), 3),
        **percentiles([e - s for s, e in spans]),
        "requests": len(spans),
        "concurrency": concurrency,
        "gpu_util_percent": gpu.mean,
    }
    if errors:
        figures["errors"] = errors
    if start_at > begin:
        figures["note"] = "a client began before the common start: its warm-up outlasted the 15 s allowed"
    return figures


def perf_analyzer(binary: str, target: Target, concurrency: int, work: Path) -> dict:
    """NVIDIA's own load generator against ``target``: the same volume (raw binary input files), ``concurrency``
    requests in flight, a bounded count of requests; its throughput and p50/p99."""
    import subprocess

    data = work / f"perf-input-{target.system}"
    data.mkdir(exist_ok=True)
    voxels = np.load(target.volume_npy)
    affine = np.asarray(target.affine, dtype=np.float64).reshape(4, 4)
    # As the model configuration names it: medserve's IMAGE is FP32 there (it takes INT16 too), Triton's INT16 here.
    voxels.astype(np.int16 if target.batched_affine else np.float32).tofile(data / "IMAGE")
    affine.tofile(data / "AFFINE")
    shape = ",".join(str(n) for n in voxels.shape)
    csv = work / f"perf-{target.system}-{target.protocol}.csv"
    command = [
        binary, "-m", MODEL, "-u", target.url, "-i", target.protocol, "--input-data", str(data),
        "--shape", f"IMAGE:{shape}" if target.batched_affine else f"IMAGE:1,{shape}",
        *([] if target.batched_affine else ["--shape", "AFFINE:4,4"]),
        "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
        "--measurement-request-count", str(2 * concurrency), "--max-trials", "2", "-f", str(csv),
    ]  # fmt: skip
    for key, value in target.headers:
        command += ["-H", f"{key}:{value}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        return {"error": "perf_analyzer ran past 90 s"}
    if done.returncode != 0 or not csv.exists():
        return {"error": (done.stdout + done.stderr)[-800:]}
    header, row = csv.read_text().splitlines()[:2]
    values = dict(zip(header.split(","), row.split(","), strict=False))
    return {
        "volumes_per_s": round(float(values["Inferences/Second"]), 3),
        "p50_ms": round(float(values["p50 latency"]) / 1000, 1),
        "p99_ms": round(float(values["p99 latency"]) / 1000, 1),
        "concurrency": concurrency,
    }


def triton_callables(spec: ModelSpec, instances: int, batch: int):
    """``instances`` callables for PyTriton, each with its own copy of the network on the GPU (as each of medserve's
    fused replicas has), warmed up for every batch size before the server takes traffic (CUDA graphs captured here,
    one instance at a time, not in the server's threads)."""
    from pytriton.decorators import batch as batched

    foreground = spec.foreground_labels

    def instance():
        predictor = Predictor(spec, torch.device("cuda"))
        predictor.warm_up(batch)

        @batched
        def infer(IMAGE: np.ndarray, AFFINE: np.ndarray) -> dict[str, np.ndarray]:  # noqa: N803 (the tensors are named so)
            volumes = [Volume(array=image, affine=affine) for image, affine in zip(IMAGE, AFFINE, strict=True)]
            inputs = [to_model_input(volume, spec.preprocessing, "cuda") for volume in volumes]
            logits = predictor([x.as_tensor() for x in inputs])
            masks, volumes_ml = [], []
            for volume, model_input, scores in zip(volumes, inputs, logits, strict=True):
                model_affine = np.asarray(model_input.affine, dtype=np.float64)
                mask = mask_on_grid(scores, model_affine, volume.affine, volume.shape, foreground)
                measured = label_volumes_ml(mask.labels, foreground, voxel_volume_ml(volume.affine))
                masks.append(mask.full().cpu().numpy())
                volumes_ml.append([measured[k] for k in foreground])
            return {"MASK": np.stack(masks), "LABEL_VOLUMES_ML": np.asarray(volumes_ml, dtype=np.float64)}

        return infer

    return [instance() for _ in range(instances)]


def measure_triton(spec: ModelSpec, targets: dict, instances: int, batch: int, args) -> dict:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    http_port, grpc_port = free_port(), free_port()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=http_port,
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        metrics_port=free_port(),
        log_verbose=1,
        log_file=args.work_ / "triton.log",
    )
    out: dict = {"instances": instances, "max_batch_size": batch}
    try:
        with Triton(config=config) as server:
            server.bind(
                model_name=MODEL,
                infer_func=triton_callables(spec, instances, batch),
                inputs=[
                    Tensor(name="IMAGE", dtype=np.int16, shape=(-1, -1, -1)),
                    Tensor(name="AFFINE", dtype=np.float64, shape=(4, 4)),
                ],
                outputs=[
                    Tensor(name="MASK", dtype=np.uint8, shape=(-1, -1, -1)),
                    Tensor(name="LABEL_VOLUMES_ML", dtype=np.float64, shape=(-1,)),
                ],
                config=ModelConfig(
                    max_batch_size=batch,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=int(BATCH_WAIT_S * 1e6)),
                ),
                strict=False,
            )
            server.run()
            for protocol, port in (("http", http_port), ("grpc", grpc_port)):
                target = Target("triton", protocol, f"127.0.0.1:{port}", **targets, batched_affine=True)
                out[protocol] = _phase(target, args)  # a phase's own failure is kept in its figures
                if protocol == "http":
                    out["mask"] = _kept(first_mask, target)
    except Exception as error:  # the server did not start or take the model: its own log says why
        log = config.log_file.read_text()[-3000:] if config.log_file.exists() else "(Triton wrote no log)"
        raise RuntimeError(f"Triton did not serve the model: {error}\n--- the end of Triton's log:\n{log}") from error
    return out


def measure_medserve(repository: Path, work: Path, replicas: int, batch: int, args) -> dict:
    from ray import serve

    from serve_app.app import build_app

    port, gpu = free_port(), torch.cuda.is_available()
    settings = ServeSettings(
        ingress="haproxy",
        gpu_sharing=args.gpu_sharing if gpu else "time-slicing",
        uploads_root=ram_backed_folder(args.size_, work),
        fused_replicas=replicas,
    )
    config = serve_config(work / "storage", repository, "fused", gpu, batch, port, settings)
    grpc_port = free_port()
    config, grpc_options = medserve_grpc(config, grpc_port)
    out: dict = {"settings": {"replicas": replicas, "max_batch_size": batch, "gpu_sharing": args.gpu_sharing}}
    with serving(settings, port, grpc_options):
        serve.run(build_app(config), name=config.name, route_prefix="/", blocking=False)
        _wait_ready(f"127.0.0.1:{port}")
        http = Target("medserve", "http", f"127.0.0.1:{port}", **args.targets_, batched_affine=False)
        out["http"] = _phase(http, args)
        out["mask"] = _kept(first_mask, http)
        if grpc_options is not None:
            grpc = Target(
                "medserve",
                "grpc",
                f"127.0.0.1:{grpc_port}",
                **args.targets_,
                batched_affine=False,
                headers=(("application", config.name),),
            )
            out["grpc"] = _phase(grpc, args)
        else:
            out["grpc"] = {"error": "this medserve has no gRPC endpoint"}
    return out


def medserve_grpc(config, port: int):
    """``config`` with medserve's gRPC endpoint on ``port``, and Serve's gRPC options for it; (config, None) where this
    medserve has none."""
    if "grpc" not in type(config).model_fields:
        return config, None
    config = config.model_copy(update={"grpc": config.grpc.model_copy(update={"enabled": True, "port": port})})
    return config, config.grpc.serve_start_options()["grpc_options"]


def _wait_ready(url: str, timeout_s: float = 300.0) -> None:
    import tritonclient.http as triton

    client, deadline = triton.InferenceServerClient(url), time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                if client.is_model_ready(MODEL):
                    return
            except Exception:
                pass
            time.sleep(2)
        raise SystemExit(f"medserve's {MODEL} was not ready in {timeout_s:.0f} s")
    finally:
        client.close()


def _phase(target: Target, args) -> dict:
    try:
        figures = load(target, args.requests, args.concurrency)
    except Exception:
        figures = {"error": traceback.format_exc(limit=3)[-1500:]}
    if args.perf_analyzer:
        figures["perf_analyzer"] = perf_analyzer(args.perf_analyzer, target, args.concurrency, args.work_)
    print(f"{target.system} {target.protocol}: {json.dumps(figures)}", flush=True)
    return figures


def _kept(make_mask, target: Target):
    """The first request's mask, kept on the side for the comparison; None where it failed."""
    try:
        return make_mask(target)
    except Exception:
        return None


def compare_masks(a: np.ndarray | None, b: np.ndarray | None) -> dict:
    if a is None or b is None or a.shape != b.shape:
        return {"compared": False}
    both = float(np.count_nonzero((a > 0) & (b > 0)))
    total = float(np.count_nonzero(a > 0) + np.count_nonzero(b > 0))
    return {
        "compared": True,
        "voxels_equal_fraction": round(float(np.mean(a == b)), 6),
        "dice": round(2 * both / total, 4) if total else 1.0,
    }


def run(args) -> dict:
    size = SIZES[args.size]
    args.size_ = size
    work = args.work_ = Path(tempfile.mkdtemp(prefix="triton-compare-"))
    volume = study_volume(size)
    study = write_study(work / "study.nii", volume)
    repository = write_repository(work / "models", size, study)
    spec = with_engine(read_model_spec(repository / MODEL / "model.yaml"), **ENGINE)
    tuned = write_tuned_repository(repository, spec, work)
    np.save(work / "volume.npy", volume.array)
    args.targets_ = {"volume_npy": str(work / "volume.npy"), "affine": tuple(np.asarray(volume.affine).ravel())}
    report: dict = {
        "benchmark": "triton_compare",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "date": datetime.date.today().isoformat(),
        "size": args.size,
        "volume": list(size.volume),
        "model": MODEL,
        "model_input": list(size.model_input),
        "engine": ENGINE,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "client": "tritonclient, one process per concurrent request; HTTP with binary tensors, gRPC",
    }
    systems = {}
    for system in args.systems.split(","):
        try:
            if system == "triton":
                systems["triton"] = measure_triton(spec, args.targets_, args.replicas, args.batch, args)
            else:
                systems["medserve"] = measure_medserve(tuned, work, args.replicas, args.batch, args)
        except Exception:
            systems[system] = {"error": traceback.format_exc(limit=5)[-3000:]}
        torch.cuda.empty_cache()
        write_report({**report, "systems": {k: _without_mask(v) for k, v in systems.items()}}, args.out)
    masks = {name: figures.pop("mask", None) for name, figures in systems.items()}
    report["systems"] = systems
    report["masks_medserve_vs_triton"] = compare_masks(masks.get("medserve"), masks.get("triton"))
    ratios = {}
    for protocol in ("http", "grpc"):
        ours, theirs = systems.get("medserve", {}).get(protocol, {}), systems.get("triton", {}).get(protocol, {})
        if "volumes_per_s" in ours and "volumes_per_s" in theirs:
            ratios[protocol] = {
                "throughput_medserve_over_triton": round(ours["volumes_per_s"] / theirs["volumes_per_s"], 3),
                "p99_medserve_over_triton": round(ours["p99_ms"] / theirs["p99_ms"], 3),
            }
    report["ratios"] = ratios
    print(json.dumps(report, indent=2))
    write_report(report, args.out)
    return report


def write_report(report: dict, out: Path) -> Path:
    """The report as ``triton-compare-<size>-<device>-<date>.json`` in ``out`` (rewritten as each system ends, so that
    a run cut short keeps what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    device = report["device"].replace(" ", "_").replace("(", "").replace(")", "")
    path = out / f"triton-compare-{report['size']}-{device}-{report['date']}.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def _without_mask(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if k != "mask"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--requests", type=int, default=64, help="timed requests per system and protocol")
    parser.add_argument("--concurrency", type=int, default=8, help="client processes, one request in flight each")
    parser.add_argument("--replicas", type=int, default=4, help="medserve's fused replicas = Triton's instances")
    parser.add_argument("--batch", type=int, default=4, help="the largest batch, both servers")
    parser.add_argument("--gpu-sharing", default="mps", choices=("mps", "time-slicing"), help="medserve's replicas")
    parser.add_argument("--systems", default="triton,medserve", help="comma-separated, run in this order")
    parser.add_argument(
        "--perf-analyzer", metavar="BINARY", help="also load each server with perf_analyzer (PyPI perf-analyzer)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
