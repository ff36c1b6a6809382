"""HTTP load from several client processes: one Python process cannot send 157 MB uploads as fast as the server
takes them (its own copies and event loop become the bottleneck the benchmark would then measure).

    load = HttpLoad(url, body, headers, processes=4)
    run = load.closed(requests=48, concurrency=16)      # or load.open(rate_per_s=24, duration_s=15)
    run.per_s, run.latencies_s, run.answers

Each client is ``python -m benchmarks.http_load PLAN``, which imports the standard library alone (a multiprocessing
child would import the benchmark's whole main module: torch, MONAI, Ray). A closed loop's clients warm up, then wait
for each other (files in a shared folder), so that the timed part starts together.

A request is sent by ``http.client`` in a thread: the body goes out in one ``sendall``, the kernel's copy alone.
httpx's async client copied it in Python first (h11 joins it into one new bytes object; Python 3.11's asyncio copies
what the socket does not take at once) and cost five times the CPU (``benchmarks.upload_path``), on the node whose
CPU the server under test needs.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["BodyPoster", "HttpLoad", "LoadRun", "closed_loop", "open_loop", "wait_until_ready"]


def wait_until_ready(url: str, timeout_s: float) -> None:
    """Poll the application's ``/readyz`` at ``url`` until it answers 200; SystemExit if it does not in time."""
    address = urlsplit(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=5)
        try:
            connection.request("GET", f"{address.path.rstrip('/')}/readyz")
            if connection.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass  # not listening yet
        finally:
            connection.close()
        time.sleep(1)
    raise SystemExit(f"medserve did not become ready at {url} within {timeout_s:.0f} s")


@dataclass
class LoadRun:
    latencies_s: list[float]
    start: float  # epoch seconds, when the timed part began
    wall_s: float
    answers: list[dict]  # a closed loop's JSON answers, the answer to latencies_s[i] at i; an open loop's: none

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


class BodyPoster:
    """POSTs one body to one URL over kept-alive connections, one per request in flight (``post`` may be called from
    several threads at once).

        poster = BodyPoster("http://127.0.0.1:8000/v1/models/ct/segment", body, {"Content-Type": "application/zip"})
        answer = poster.post()  # the JSON answer
    """

    def __init__(self, url: str, body: bytes, headers: dict):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.body, self.headers = body, {**headers, "Content-Length": str(len(body))}
        self.idle: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()

    def post(self) -> dict:
        """The answer's JSON; ``RuntimeError`` for an error or a redirect."""
        try:
            status, text = self._exchange(self.idle.get_nowait())
        except queue.Empty:
            status, text = self._exchange(http.client.HTTPConnection(self.host, self.port, timeout=600))
        except ConnectionError:  # a kept-alive connection the server had closed meanwhile: once more, on a new one
            status, text = self._exchange(http.client.HTTPConnection(self.host, self.port, timeout=600))
        if status >= 300:
            raise RuntimeError(f"POST {self.target}: {status} {text[:300]!r}")
        return json.loads(text)

    def _exchange(self, connection: http.client.HTTPConnection) -> tuple[int, bytes]:
        try:
            connection.request("POST", self.target, body=self.body, headers=self.headers)
            response = connection.getresponse()
            text = response.read()
        except BaseException:
            connection.close()
            raise
        self.idle.put(connection)
        return response.status, text


async def _client(plan: dict) -> dict:
    poster = BodyPoster(plan["url"], Path(plan["body"]).read_bytes(), plan["headers"])
    # Enough threads that an open loop's requests are never queued behind each other here.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(64, thread_name_prefix="http-load"))

    async def call() -> dict:
        return await asyncio.to_thread(poster.post)

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
