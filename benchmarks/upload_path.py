"""The upload path alone, side by side in one run: what receiving a 157 MB body costs the server, what spooling it
to RAM-backed disk adds, and what sending it costs the benchmark's HTTP load clients.

    python -m benchmarks.upload_path [--uploads 8] [--out benchmarks/results]

A uvicorn server in its own process (the ingress's web server; no Ray) answers two routes: ``/receive`` reads the
body and counts it (the transport ceiling's sink), ``/spool`` writes it to a folder under ``/dev/shm`` through the
ingress's own ``spool_request``. Each answer carries the server's wall and CPU milliseconds for that body (one upload
at a time, so that the process's CPU time is that upload's). This process sends the uploads, once through httpx's
async client (what the load clients used) and once through ``benchmarks.http_load``'s ``http.client`` poster, and
counts its own CPU time for each. Last, the machine's memory copy rate (``memory_copy_gb_per_s``: one thread, and
eight at once): every layer of the HTTP path copies each upload at least once, and the GPU machines differ in it.
Writes ``upload-path-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from benchmarks.http_load import BodyPoster

__all__ = ["main"]

RESULTS = Path(__file__).parent / "results"
_BODY_MB = 157  # the full-size study's raw NIfTI
_SERVER = "benchmarks._upload_path_server:app"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=8, help="timed uploads per route and client (default 8)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    body = os.urandom(1 << 20) * _BODY_MB
    port = _free_port()
    spool = tempfile.mkdtemp(prefix="upload-path-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", _SERVER, "--port", str(port), "--log-level", "warning"],
        env={**os.environ, "UPLOAD_PATH_SPOOL": spool},
    )
    try:
        _wait_for(port)
        base = f"http://127.0.0.1:{port}"
        report = {
            "device": _device_name(),
            "cores": os.cpu_count(),
            "date": datetime.date.today().isoformat(),
            "body_mb": _BODY_MB,
            "uploads": args.uploads,
            "server": {route: _server_side(base, route, body, args.uploads) for route in ("receive", "spool")},
            "client_cpu_ms_per_upload": {
                "httpx_async": _client_cpu_ms(lambda: asyncio.run(_send_httpx(f"{base}/receive", body, args.uploads))),
                "http_client": _client_cpu_ms(lambda: _send_plain(f"{base}/receive", body, args.uploads)),
            },
        }
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(spool, ignore_errors=True)
    report["memory_copy_gb_per_s"] = {"one_thread": _memory_copy_gb_per_s(1), "eight_threads": _memory_copy_gb_per_s(8)}
    server_side, client = report["server"], report["client_cpu_ms_per_upload"]
    report["ratios"] = {
        "spool_over_receive_wall": round(server_side["spool"]["wall_ms"] / server_side["receive"]["wall_ms"], 3),
        "spool_over_receive_cpu": round(server_side["spool"]["cpu_ms"] / server_side["receive"]["cpu_ms"], 3),
        "http_client_over_httpx_cpu": round(client["http_client"] / client["httpx_async"], 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"upload-path-{re.sub(r'[^A-Za-z0-9]+', '_', report['device']).strip('_')}-{report['date']}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def _server_side(base: str, route: str, body: bytes, uploads: int) -> dict:
    """The server's median wall and CPU ms for one body on ``route``, after two untimed uploads."""
    poster = BodyPoster(f"{base}/{route}", body, {"Content-Type": "application/octet-stream"})
    answers = [poster.post() for _ in range(uploads + 2)][2:]
    return {key: round(statistics.median(a[key] for a in answers), 1) for key in ("wall_ms", "cpu_ms")}


def _memory_copy_gb_per_s(threads: int, mb: int = 256, rounds: int = 4) -> float:
    """GB copied a second by ``threads`` threads at once, each copying its own ``mb`` MB buffer (numpy's copy
    releases the GIL); the buffers' pages are touched first."""
    sources = [np.ones(mb << 20, np.uint8) for _ in range(threads)]
    targets = [np.zeros_like(source) for source in sources]
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        for _ in range(rounds):
            list(pool.map(np.copyto, targets, sources))
        elapsed = time.perf_counter() - start
    return round(threads * rounds * (mb << 20) / elapsed / 1e9, 1)


def _client_cpu_ms(send) -> float:
    send()  # warm: connections, imports, first-touch of buffers
    before = _cpu_s()
    uploads = send()
    return round((_cpu_s() - before) * 1e3 / uploads, 1)


async def _send_httpx(url: str, body: bytes, uploads: int) -> int:
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(uploads):
            (await client.post(url, content=body)).raise_for_status()
    return uploads


def _send_plain(url: str, body: bytes, uploads: int) -> int:
    poster = BodyPoster(url, body, {"Content-Type": "application/octet-stream"})
    for _ in range(uploads):
        poster.post()
    return uploads


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the upload-path server did not listen on port {port} within {timeout_s} s")


def _device_name() -> str:
    """The GPU machine's GPU where there is one (its host is what the JSON's figures are of), else the CPU."""
    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        return f"{gpu.strip()} host"
    except (OSError, subprocess.CalledProcessError, IndexError):
        return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
