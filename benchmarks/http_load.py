"""HTTP load from several client processes: one Python process cannot send 157 MB uploads as fast as the server
takes them (its own copies and event loop become the bottleneck the benchmark would then measure).

    load = HttpLoad(url, body, headers, processes=4)
    run = load.closed(requests=48, concurrency=16)      # or load.open(rate_per_s=24, duration_s=15)
    run.per_s, run.latencies_s, run.answers

Each client is ``python -m benchmarks.http_load PLAN``, which imports httpx and little else (a multiprocessing child
would import the benchmark's whole main module: torch, MONAI, Ray). A closed loop's clients warm up, then wait for
each other (files in a shared folder), so that the timed part starts together.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["HttpLoad", "LoadRun", "closed_loop", "open_loop"]


@dataclass
class LoadRun:
    latencies_s: list[float]
    start: float  # epoch seconds, when the timed part began
    wall_s: float
    answers: list[dict]  # the JSON answers, in no particular order

    @property
    def window(self) -> tuple[float, float]:
        """The timed part, in epoch seconds: what a sampler's figures are narrowed to."""
        return self.start, self.start + self.wall_s

    @property
    def per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s


@dataclass(frozen=True)
class HttpLoad:
    url: str
    body: bytes
    headers: dict
    processes: int = 4

    def closed(self, requests: int, concurrency: int) -> LoadRun:
        """``requests`` sent by ``concurrency`` clients in all, each sending its next when its last is answered."""
        shares = zip(_split(requests, self.processes), _split(concurrency, self.processes), strict=True)
        return self._run([{"kind": "closed", "requests": r, "concurrency": c} for r, c in shares if c])

    def open(self, rate_per_s: float, duration_s: float) -> LoadRun:
        """Requests at ``rate_per_s`` in all for ``duration_s``, whatever the answers do."""
        plan = {"kind": "open", "rate_per_s": rate_per_s / self.processes, "duration_s": duration_s}
        return self._run([plan] * self.processes)

    def _run(self, plans: list[dict]) -> LoadRun:
        with tempfile.TemporaryDirectory(prefix="http-load-") as folder:
            body = Path(folder) / "body"
            body.write_bytes(self.body)
            common = {"url": self.url, "headers": self.headers, "body": str(body), "sync": folder}
            common["parties"] = len(plans)
            clients = [
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.http_load", json.dumps({**common, **plan, "index": i})],
                    stdout=subprocess.PIPE,
                )
                for i, plan in enumerate(plans)
            ]
            parts = []
            for client in clients:
                out, _ = client.communicate()
                if client.returncode != 0:
                    raise RuntimeError(f"an HTTP load client failed (exit {client.returncode}); see its stderr")
                parts.append(json.loads(out))
        start, end = min(p["start"] for p in parts), max(p["end"] for p in parts)
        return LoadRun(
            latencies_s=[x for p in parts for x in p["latencies"]],
            start=start,
            wall_s=end - start,
            answers=[a for p in parts for a in p["answers"]],
        )


async def closed_loop(call, requests: int, concurrency: int) -> tuple[list[float], float, list]:
    """``requests`` awaits of ``call()`` by ``concurrency`` workers, each starting its next when its last ends: the
    latencies, the wall time, and what the calls returned."""
    latencies, outcomes, left = [], [], [requests]

    async def worker():
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            outcomes.append(await call())
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start, outcomes


async def open_loop(call, rate_per_s: float, duration_s: float) -> list[float]:
    """``call()`` at a fixed rate whatever the answers do, for ``duration_s``: the latencies a steady load sees."""
    latencies = []

    async def one():
        t0 = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - t0)

    tasks, start = [], time.perf_counter()
    for i in range(max(int(rate_per_s * duration_s), 1)):
        await asyncio.sleep(max(start + i / rate_per_s - time.perf_counter(), 0))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return latencies


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _client(plan: dict) -> dict:
    body = Path(plan["body"]).read_bytes()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as client:

        async def call() -> dict:
            response = await client.post(plan["url"], content=body, headers=plan["headers"])
            if response.is_error or response.is_redirect:
                raise RuntimeError(f"POST {plan['url']}: {response.status_code} {response.text[:300]}")
            return response.json()

        if plan["kind"] == "closed":
            await closed_loop(call, plan["concurrency"], plan["concurrency"])  # warm-up: one round
        await _wait_for_the_others(Path(plan["sync"]), plan["index"], plan["parties"])
        start = time.time()
        if plan["kind"] == "closed":
            latencies, _, answers = await closed_loop(call, plan["requests"], plan["concurrency"])
        else:
            latencies, answers = await open_loop(call, plan["rate_per_s"], plan["duration_s"]), []
        return {"start": start, "end": time.time(), "latencies": latencies, "answers": answers}


async def _wait_for_the_others(folder: Path, index: int, parties: int) -> None:
    (folder / f"ready-{index}").touch()
    while len(list(folder.glob("ready-*"))) < parties:
        await asyncio.sleep(0.005)


if __name__ == "__main__":
    json.dump(asyncio.run(_client(json.loads(sys.argv[1]))), sys.stdout)
