"""Where a phase's CPU time goes: core-seconds per request for each kind of process on the machine.

The HTTP path is CPU-bound on one node (the GPU waits): which processes spend the cores is the question that says
what to make cheaper. A sampler thread reads every process's CPU times five times a second; a phase's figures are the
differences between the samples that bracket its timed part, grouped by what the process is.

    with CpuSampler() as cpu:
        run = load.closed(48, 16)
    cpu.window = run.window
    cpu.per_request(len(run.latencies_s))  # {"busy_cores": 9.7, "core_ms_per_request": {"ingress replicas": 131.0, …}}
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections import defaultdict

import psutil

__all__ = ["CpuSampler", "kind_of"]

_INTERVAL_S = 0.2
_REPLICA = re.compile(r"^ray::ServeReplica:[^:]+:([^: ]+)")


def kind_of(name: str, cmdline: list[str]) -> str:
    """What a process is, from its name and command line (Ray titles a replica ``ray::ServeReplica:<app>:<name>``)."""
    title = " ".join(cmdline)
    if replica := _REPLICA.match(title):
        deployment = replica.group(1)
        if deployment.startswith("FusedPipeline"):
            return "fused pipeline replicas"
        return {"Ingress": "ingress replicas", "BodySink": "body sink replicas"}.get(deployment, deployment)
    if "multiprocessing.spawn" in title or "multiprocessing.forkserver" in title:
        return "DICOM header processes"  # the only processes medserve's replicas spawn
    if "benchmarks.http_load" in title:
        return "HTTP load clients"
    if "haproxy" in name:
        return "HAProxy"
    if name in ("raylet", "gcs_server") or title.startswith("ray::") or "ray/" in title:
        return "Ray (raylet, GCS, controller, proxy, workers)"
    if "benchmarks.pipeline" in title:
        return "benchmark driver"
    return "other"


class CpuSampler:
    """CPU times of every process on the machine, sampled in a thread while the block runs."""

    def __init__(self):
        self.times: list[float] = []
        self.samples: list[dict[int, tuple[str, float]]] = []  # pid -> (kind, user + system seconds)
        self.window: tuple[float, float] | None = None

    def __enter__(self):
        self._stop = threading.Event()
        self._kinds: dict[int, str] = {}
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def per_request(self, requests: int) -> dict:
        """Over the window (widened to the samples that bracket it): the busy cores, all processes' and by kind, and
        each kind's CPU milliseconds per request (``requests`` in the window)."""
        start, end = self.window or (self.times[0], self.times[-1])
        first = max(bisect.bisect_right(self.times, start) - 1, 0)
        last = min(bisect.bisect_left(self.times, end), len(self.times) - 1)
        seconds = self.times[last] - self.times[first]
        if seconds <= 0:
            return {}
        latest: dict[int, tuple[str, float]] = {}
        for sample in self.samples[first + 1 : last + 1]:
            latest.update(sample)  # a process that ended in the bracket: its last reading
        spent: dict[str, float] = defaultdict(float)
        before = self.samples[first]
        for pid, (kind, cpu) in latest.items():
            spent[kind] += cpu - before.get(pid, (kind, 0.0))[1]  # a process started in the bracket: all of it
        # Requests in the bracket, not only the window: the CPU counted is the bracket's.
        requests_in_bracket = requests * seconds / max(end - start, 1e-9)
        return {
            "cores": psutil.cpu_count(),
            "seconds": round(seconds, 2),
            "busy_cores": round(sum(spent.values()) / seconds, 2),
            "busy_cores_by_kind": {k: round(v / seconds, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])},
            "core_ms_per_request": {
                k: round(v / max(requests_in_bracket, 1e-9) * 1000, 1) for k, v in spent.items() if v > 0
            },
        }

    def _run(self) -> None:
        while not self._stop.wait(_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        sample = {}
        for process in psutil.process_iter(["name", "cpu_times"]):
            try:
                pid = process.pid
                if pid not in self._kinds:
                    self._kinds[pid] = kind_of(process.info["name"] or "", process.cmdline())
                cpu = process.info["cpu_times"]
                sample[pid] = (self._kinds[pid], cpu.user + cpu.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.samples.append(sample)
        self.times.append(time.time())
