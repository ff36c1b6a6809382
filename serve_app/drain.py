"""Draining an application before it stops (``medserve down``): new work refused with 503, work in flight finished.

``medserve down`` asks through a file in the shared storage (``<storage.root>/drain/<app>/``), the one place every
ingress replica of a multi-node cluster sees. Each replica's ``DrainWatch`` looks for it twice a second; from then
on its ingress refuses new work (``ShuttingDown``, 503 with Retry-After) and the watch writes beside the request how
many requests the replica still has in flight. ``DrainOrder.wait`` returns once every replica reports none, or the
grace period is over; then down deletes the application.

Usage, in ``medserve down``::

    order = DrainOrder(config)
    order.start(grace_s=60)
    order.wait(replicas=2)   # the ingress's running replicas
    serve.delete(config.name)
    order.clear()
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.config import AppConfig

__all__ = ["DrainGate", "DrainOrder", "DrainWatch"]

_ORDER_FILE = "order.json"
_POLL_S = 0.5
_HEALTH_PATHS = ("/healthz", "/readyz")


def _folder(config: AppConfig) -> Path:
    return config.storage.root / "drain" / config.name


class DrainWatch:
    """In an ingress replica: whether its application is draining, and its count of requests in flight."""

    def __init__(self, config: AppConfig, replica_id: str):
        self._folder = _folder(config)
        self._report = self._folder / f"{replica_id}.json"
        self._draining = threading.Event()
        self.in_flight = 0  # changed on the replica's event loop only; read by the watching thread
        threading.Thread(target=self._watch, name="drain-watch", daemon=True).start()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def _watch(self) -> None:
        order = self._folder / _ORDER_FILE
        while True:
            if order.exists():
                self._draining.set()
                self._report.write_text(json.dumps({"in_flight": self.in_flight}))
            elif self._draining.is_set():  # the order withdrawn (medserve up again): take work again
                self._draining.clear()
            time.sleep(_POLL_S)


class DrainGate:
    """ASGI middleware of the ingress: while its replica's ``DrainWatch`` (``app.state.drain``) sees a drain, a new
    POST is answered with ``refusal()`` (a 503) and goes no further; every other request is counted in flight while
    it runs. The health routes (Serve's and HAProxy's checks) pass untouched, as does everything before the watch
    is set.

    Plain ASGI, not Starlette's ``BaseHTTPMiddleware``: that one relays each request's body through a stream of its
    own: an ingress replica spent 369 CPU-ms receiving a 157 MB upload through it, 251 without (README: Benchmarks).

    Usage::

        api.add_middleware(DrainGate, refusal=lambda: JSONResponse({...}, status_code=503))
    """

    def __init__(self, app: ASGIApp, *, refusal: Callable[[], Response]):
        self.app, self.refusal = app, refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = getattr(scope["app"].state, "drain", None) if scope["type"] == "http" else None
        if watch is None or scope["path"].endswith(_HEALTH_PATHS):
            await self.app(scope, receive, send)
            return
        if watch.draining and scope["method"] == "POST":
            await self.refusal()(scope, receive, send)
            return
        watch.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            watch.in_flight -= 1


class DrainOrder:
    """In ``medserve down``: the order to drain, and the replicas' reports of what they still have in flight."""

    def __init__(self, config: AppConfig):
        self._folder = _folder(config)

    def start(self, grace_s: float) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        for report in self._folder.glob("*.json"):  # an earlier drain's
            report.unlink()
        self._deadline = time.monotonic() + grace_s
        (self._folder / _ORDER_FILE).write_text(json.dumps({"grace_s": grace_s}))

    def in_flight(self) -> dict[str, int]:
        """Requests in flight, by replica, as each last reported."""
        reports = {}
        for report in self._folder.glob("*.json"):
            if report.name != _ORDER_FILE:
                try:
                    reports[report.stem] = json.loads(report.read_text())["in_flight"]
                except (OSError, ValueError, KeyError):  # written as it was read: the next look has it
                    continue
        return reports

    def wait(self, replicas: int) -> dict[str, int]:
        """Until ``replicas`` replicas report nothing in flight, or the grace period ends; the last reports."""
        while True:
            reports = self.in_flight()
            if len(reports) >= replicas and not any(reports.values()):
                return reports
            if time.monotonic() >= self._deadline:
                return reports
            time.sleep(_POLL_S)

    def clear(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)
