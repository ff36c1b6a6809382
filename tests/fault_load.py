"""A bounded load of segment requests from clients that behave as a hospital's should: each sends a study; on a
503 it waits its Retry-After and sends it again, and so it does (after a second) when the connection is dropped
before any answer (the ingress replica holding it died). What each request came to is counted, so a fault
injected while the load runs shows as numbers: sent, completed, retried, failed, hung, p99.

Usage::

    report = run_load(url, body, fault=lambda: kill_a_replica(), clients=8, duration_s=30, fault_at_s=10)
    print(report.line())
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

__all__ = ["SUMMARY", "LoadReport", "run_load"]

# What the load tests found, by heading: printed at the end of the test run (conftest's pytest_terminal_summary),
# so CI's log has the counts whatever the output capture.
SUMMARY: dict[str, list[str]] = {}

_MAX_ATTEMPTS = 20
_RECONNECT_WAIT_S = 1.0


@dataclass
class LoadReport:
    """What the requests of one load came to. ``sent`` counts requests, not attempts: one retried twice and then
    completed counts once in ``sent`` and ``completed``, and twice in ``retries``."""

    fault: str
    sent: int = 0
    completed: int = 0
    retries: int = 0  # 503 answers a client waited out, and dropped connections, each followed by a retry
    dropped: int = 0  # of those, connections dropped without an answer
    retried_requests: int = 0  # requests that needed at least one retry
    failed: list[str] = field(default_factory=list)  # answers other than 200 and 503; requests out of attempts
    hung: int = 0  # requests without an answer within the client's timeout
    in_flight_at_fault: int = 0
    latencies_s: list[float] = field(default_factory=list)  # of completed requests, first attempt to answer
    result_ids: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies_s, 99) * 1000) if self.latencies_s else float("nan")

    def line(self) -> str:
        return (
            f"{self.fault:<28} sent {self.sent:4d}  completed {self.completed:4d}  retried {self.retried_requests:3d} "
            f"({self.retries} retries, {self.dropped} after a dropped connection)  "
            f"failed {len(self.failed):2d}  hung {self.hung}  "
            f"in flight at the fault {self.in_flight_at_fault:2d}  p99 {self.p99_ms:6.0f} ms"
        )


def run_load(
    url: str,
    body: bytes,
    *,
    fault_name: str,
    fault: Callable[[], None] | None = None,
    clients: int = 8,
    duration_s: float = 30,
    fault_at_s: float = 10,
    timeout_s: float = 120,
    headers: dict[str, str] | None = None,
    stop: threading.Event | None = None,
) -> LoadReport:
    """``clients`` threads POST ``body`` to ``url`` for ``duration_s`` (or until ``stop`` is set); ``fault()`` runs
    ``fault_at_s`` in. A request begun before the end is followed to its answer; one without an answer in
    ``timeout_s`` (past the server's deadline) counts as hung."""
    report = LoadReport(fault=fault_name)
    in_flight = [0]
    end = time.monotonic() + duration_s
    stop = stop or threading.Event()

    def client() -> None:
        with httpx.Client(timeout=timeout_s) as http:
            while time.monotonic() < end and not stop.is_set():
                _one_request(http, url, body, headers or {}, report, in_flight)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    if fault is not None:
        time.sleep(fault_at_s)
        with report._lock:
            report.in_flight_at_fault = in_flight[0]
        fault()
    for thread in threads:
        thread.join()
    return report


def _one_request(
    http: httpx.Client, url: str, body: bytes, headers: dict[str, str], report: LoadReport, in_flight: list[int]
) -> None:
    started = time.monotonic()
    retries = 0
    wait_s = 0.0
    with report._lock:
        report.sent += 1
        in_flight[0] += 1
    try:
        for _attempt in range(_MAX_ATTEMPTS):
            time.sleep(wait_s)
            try:
                answer = http.post(url, content=body, headers=headers)
            except httpx.TimeoutException:
                with report._lock:
                    report.hung += 1
                return
            except httpx.TransportError:
                retries += 1
                wait_s = _RECONNECT_WAIT_S
                with report._lock:
                    report.retries += 1
                    report.dropped += 1
                continue
            if answer.status_code == 503 and "retry-after" in answer.headers:
                retries += 1
                wait_s = float(answer.headers["retry-after"])
                with report._lock:
                    report.retries += 1
                continue
            with report._lock:
                if answer.status_code == 200:
                    report.completed += 1
                    report.latencies_s.append(time.monotonic() - started)
                    report.result_ids.append(answer.json()["result_id"])
                else:
                    report.failed.append(f"{answer.status_code}: {answer.text[:300]}")
                report.retried_requests += retries > 0
            return
        with report._lock:
            report.failed.append(f"no answer but 503 or a dropped connection in {_MAX_ATTEMPTS} attempts")
            report.retried_requests += 1
    finally:
        with report._lock:
            in_flight[0] -= 1
