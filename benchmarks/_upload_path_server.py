"""The server of ``benchmarks.upload_path``: uvicorn runs ``app``; uploads are spooled under ``$UPLOAD_PATH_SPOOL``."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve_app.studies.upload import UploadBudget, spool_request

__all__ = ["app"]

_SPOOL = Path(os.environ.get("UPLOAD_PATH_SPOOL", tempfile.gettempdir()))


async def receive(request: Request) -> JSONResponse:
    """The body read and counted, as the transport ceiling's sink does."""
    cpu, wall = time.process_time(), time.perf_counter()
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
    return _timed(received, cpu, wall)


async def spool(request: Request) -> JSONResponse:
    """The body spooled as the ingress spools an upload, then deleted."""
    cpu, wall = time.process_time(), time.perf_counter()
    folder = Path(tempfile.mkdtemp(dir=_SPOOL))
    try:
        written = await spool_request(request, folder, UploadBudget(max_bytes=1 << 34, max_files=1))
        return _timed(written, cpu, wall)
    finally:
        shutil.rmtree(folder)


def _timed(n_bytes: int, cpu: float, wall: float) -> JSONResponse:
    return JSONResponse(
        {"bytes": n_bytes, "wall_ms": (time.perf_counter() - wall) * 1e3, "cpu_ms": (time.process_time() - cpu) * 1e3}
    )


app = Starlette(routes=[Route("/receive", receive, methods=["POST"]), Route("/spool", spool, methods=["POST"])])
