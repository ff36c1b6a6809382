"""What WSI jobs leave on storage, deleted after ``wsi.retention_days``: uploaded slides, and ended jobs' records
with their out folders.

A job's age counts from when it ended (``finished`` in its record). Jobs resumed into one ``out`` share its folder,
so the folder goes only once every job that wrote it is past retention, with their records.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path

from serve_app.config import WsiConfig
from serve_app.wsi.job_status import UPLOADS_FOLDER, WsiJobStatus

__all__ = ["ABANDONED_UPLOAD_S", "sweep_wsi"]

# An upload in progress writes its .partial file continuously: one untouched this long lost its request.
ABANDONED_UPLOAD_S = 3600.0


def sweep_wsi(wsi: WsiConfig, now: float | None = None) -> None:
    """Delete the uploads and jobs of ``wsi.output_root`` past ``wsi.retention_days`` at ``now`` (default: now)."""
    now = time.time() if now is None else now
    cutoff = now - wsi.retention_days * 86400
    _sweep_uploads(wsi.output_root, cutoff, now)
    _sweep_jobs(wsi, cutoff)


def _sweep_uploads(output_root: Path, cutoff: float, now: float) -> None:
    for folder in output_root.glob(f"*/{UPLOADS_FOLDER}"):
        for path in folder.iterdir():
            limit = now - ABANDONED_UPLOAD_S if path.name.endswith(".partial") else cutoff
            try:
                if path.stat().st_mtime < limit:  # a slide's file is written once, when it is received
                    path.unlink()
            except FileNotFoundError:  # another ingress replica's sweep won
                continue


def _sweep_jobs(wsi: WsiConfig, cutoff: float) -> None:
    jobs_of_out: dict[str, list[tuple[Path, float]]] = defaultdict(list)
    for path in wsi.jobs.glob("*.json"):
        try:
            status = WsiJobStatus.model_validate_json(path.read_text())
            # A job that has not ended: its driver rewrites the record as tiles finish, so the file's time is its
            # last sign of life (a driver that died long ago left it unchanged).
            ended = status.finished.timestamp() if status.finished else path.stat().st_mtime
        except (OSError, ValueError):  # being replaced, or not a record
            continue
        jobs_of_out[status.out_path].append((path, ended))
    root = wsi.output_root.resolve()
    for out_path, jobs in jobs_of_out.items():
        if any(ended >= cutoff for _, ended in jobs):
            continue
        out = Path(out_path).resolve()
        if out.is_relative_to(root) and out != root:  # a record names its folder: never anything outside
            shutil.rmtree(out, ignore_errors=True)
        for path, _ in jobs:
            path.unlink(missing_ok=True)
