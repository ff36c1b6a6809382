"""Noisy neighbour: tenant B's latency at a steady rate alone, alone again (the control: how much B's p99 moves
with nothing changed), then while tenant A floods at 10x its quota.

    python -m benchmarks.noisy_neighbour            # or: make bench-tenants
    python -m benchmarks.noisy_neighbour --rounds 1 --seconds 20    # a quick look
    python -m benchmarks.noisy_neighbour --gpu --study full         # the GPU machine: 512x512x300 CT series

Starts its own local Ray cluster, deploys medserve with the two tenants, sends open-loop load (requests
leave on a fixed schedule, whatever the server does) and writes benchmarks/results/noisy_neighbour.json.
The phases alternate (alone, alone, flood; alone, alone, flood...) so that a change in the machine's other load
during the run weighs on all alike; each round gives a control ratio (second alone / first) and a flood ratio
(flood / both alone), so the flood's effect is read against the run's own noise floor.
Target: B's p99 with the flood <= 1.2 x B's p99 alone, no 429 for B, only 200s and 429s for A.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import platform
import socket
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from benchmarks.http_load import wait_until_ready
from serve_app.config import AppConfig, load_config
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series
from serve_app.tenancy.keys import hash_api_key, new_api_key

RESULTS = Path(__file__).with_name("results") / "noisy_neighbour.json"
SEGMENT = "/v1/models/ct-phantom-organ/segment"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (B alone, B with A's flood)")
    parser.add_argument("--seconds", type=float, default=40, help="length of each phase")
    parser.add_argument("--b-rate", type=float, default=1.0, help="tenant B's steady rate, requests/s")
    parser.add_argument("--a-quota", type=float, default=0.25, help="tenant A's quota, requests/s; it sends 10x this")
    parser.add_argument(
        "--flood-factor", type=float, default=10, help="A sends this many times its quota (1: a control run)"
    )
    parser.add_argument(
        "--study", choices=["small", "full"], default="small", help="64x64x12 CT series, or a 512x512x300 one"
    )
    parser.add_argument("--gpu", action="store_true", help="the stages on the GPU (preprocessing, model, post)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    keys = {"a": new_api_key(), "b": new_api_key()}
    with tempfile.TemporaryDirectory() as storage:
        config = _config(keys, args, Path(storage))
        url = _deploy(config)
        try:
            figures = asyncio.run(_run(url, keys, args, _study(args.study)))
        finally:
            import ray

            ray.shutdown()
    report = {
        "noisy_neighbour": figures,
        "parameters": {
            "rounds": args.rounds,
            "seconds_per_phase": args.seconds,
            "b_rate_per_s": args.b_rate,
            "a_quota_per_s": args.a_quota,
            "a_sends_per_s": args.a_quota * args.flood_factor,
            "study": f"CT phantom {'x'.join(map(str, STUDY_SHAPES[args.study]))}, zipped DICOM",
            "gpu": args.gpu,
            "processing_slots": config.scheduling.processing_slots,
        },
        "device": _device(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _config(keys: dict[str, str], args, storage: Path) -> AppConfig:
    def tenant(name, key, per_second, burst, max_concurrent):
        return {
            "name": name,
            "api_key_hashes": [hash_api_key(key)],
            "models": ["*"],
            "rate": {"per_second": per_second, "burst": burst},
            "max_concurrent": max_concurrent,
        }

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # On the GPU: the stages' replicas share it (as the pipeline benchmark's split layout places them).
    on_gpu = {
        "deployments.preprocess": {"num_replicas": 2, "num_gpus": 0.125, "num_cpus": 1},
        "deployments.model": {"num_replicas": 2, "num_gpus": 0.25, "num_cpus": 1},
        "deployments.postprocess": {"num_replicas": 2, "num_gpus": 0.125, "num_cpus": 1},
    }
    return load_config(
        overrides={
            **(on_gpu if args.gpu else {}),
            "storage.root": str(storage),
            "http.port": port,
            "tenants": {
                "flood-hospital": tenant("A: floods", keys["a"], args.a_quota, 1, 1),
                # B's quota leaves it room: at its steady rate it must never see a 429.
                "steady-hospital": tenant("B: steady", keys["b"], args.b_rate * 4, 10, 8),
            },
        }
    )


def _deploy(config: AppConfig) -> str:
    import ray
    from ray import serve

    from serve_app.app import build_app

    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    serve.start(**config.http.serve_start_options())
    serve.run(build_app(config), name=config.name, route_prefix="/", blocking=False)
    url = f"http://{config.http.host}:{config.http.port}"
    wait_until_ready(url, timeout_s=300)
    return url


STUDY_SHAPES = {"small": (64, 64, 12), "full": (512, 512, 300)}
_STUDY_SPACINGS = {"small": (5.4, 5.4, 8.0), "full": (0.7, 0.7, 1.0)}


def _study(size: str) -> bytes:
    phantom = ct_phantom(np.random.default_rng(20_001), shape=STUDY_SHAPES[size], spacing=_STUDY_SPACINGS[size])
    with tempfile.TemporaryDirectory() as folder:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            for path in write_ct_series(phantom.volume, Path(folder)):
                zf.write(path, path.name)
    return buffer.getvalue()


async def _run(url: str, keys: dict[str, str], args, study: bytes) -> dict:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await _steady(client, keys["b"], 2.0, 5, study)  # warm-up: load the model, fill caches
        alone, with_flood, flood, rounds = [], [], [], []
        for _ in range(args.rounds):
            first = await _steady(client, keys["b"], args.b_rate, args.seconds, study)
            control = await _steady(client, keys["b"], args.b_rate, args.seconds, study)
            b, a = await asyncio.gather(
                _steady(client, keys["b"], args.b_rate, args.seconds, study),
                _steady(client, keys["a"], args.a_quota * args.flood_factor, args.seconds, study),
            )
            rounds.append(
                {
                    "control_ratio": round(_p99(control) / _p99(first), 3),
                    "flood_ratio": round(_p99(b) / _p99(first + control), 3),
                }
            )
            alone, with_flood, flood = alone + first + control, with_flood + b, flood + a
            await asyncio.sleep(2)  # A's last admitted requests drain before B is alone again
    p99_alone, p99_flood = _p99(alone), _p99(with_flood)
    return {
        "p99_alone_ms": p99_alone,
        "p99_flood_ms": p99_flood,
        "p99_ratio": round(p99_flood / p99_alone, 3),
        "target_ratio": 1.2,
        "rounds": rounds,
        "spread": {key: _spread([r[key] for r in rounds]) for key in ("control_ratio", "flood_ratio")},
        "p50_alone_ms": _p(alone, 50),
        "p50_flood_ms": _p(with_flood, 50),
        "b_requests": {"alone": len(alone), "with_flood": len(with_flood)},
        "b_status_alone": _codes(alone),
        "b_status_with_flood": _codes(with_flood),
        "a_status": _codes(flood),
    }


async def _steady(client: httpx.AsyncClient, key: str, rate: float, seconds: float, body: bytes) -> list[tuple]:
    """Open-loop load: request i leaves at i / rate seconds, whether or not earlier ones have answered."""
    loop = asyncio.get_running_loop()
    start, sent = loop.time(), []
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        sent.append(asyncio.create_task(_timed_post(client, key, body)))
    return await asyncio.gather(*sent)


async def _timed_post(client: httpx.AsyncClient, key: str, body: bytes) -> tuple:
    start = time.perf_counter()
    try:
        response = await client.post(
            SEGMENT, content=body, headers={"content-type": "application/zip", "x-api-key": key}
        )
        status = response.status_code
    except httpx.HTTPError as e:
        status = type(e).__name__
    return status, time.perf_counter() - start


def _p(samples: list[tuple], q: float) -> float:
    """The q-th percentile latency in ms, a request that did not end in 200 counted as never answered (infinite):
    a tenant whose requests fail is not served faster. inf where more than (100 - q) % failed."""
    latencies = [latency if status == 200 else np.inf for status, latency in samples]
    value = float(np.percentile(latencies, q, method="higher"))
    return round(value * 1000, 1) if np.isfinite(value) else float("inf")


def _p99(samples: list[tuple]) -> float:
    return _p(samples, 99)


def _spread(ratios: list[float]) -> dict:
    return {"min": min(ratios), "median": float(np.median(ratios)), "max": max(ratios)}


def _codes(samples: list[tuple]) -> dict:
    return {str(k): v for k, v in sorted(Counter(status for status, _ in samples).items(), key=str)}


def _device() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    # The machine may be shared: its load at the end says how quiet the run was.
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
    }


def _gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
