"""Retention that runs whether or not requests come: a sweep on a timer deletes what is past its time.

- results, ``storage.result_retention_hours`` after each was made (``ResultStore.sweep``);
- uploaded slides and ended WSI jobs' records and outputs, after ``wsi.retention_days`` (``sweep_wsi``);
- the upload folders (``<storage.uploads>/<request id>``) of requests whose ingress died before deleting them.

It also indexes, once, the results stored before the review worklist's index existed (``ResultStore.index_existing``):
a walk of every result, which belongs here rather than in a request.

Every ingress replica runs one (``RetentionSweeper(config).start()`` in its ``__init__``): a sweep deletes only what
has expired, so replicas sweeping the same shared storage at once do no harm, and the sweep goes on while one
replica is restarted.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time

from serve_app.config import AppConfig
from serve_app.results import ResultStore
from serve_app.wsi.retention import sweep_wsi

__all__ = ["ORPHANED_UPLOAD_S", "RetentionSweeper"]

logger = logging.getLogger(__name__)
# A request's upload folder is deleted when the request ends, and no request outlives its deadline: one older than
# an hour and than the longest deadline was left by an ingress that died.
ORPHANED_UPLOAD_S = 3600.0


class RetentionSweeper:
    """Sweeps the storage of the application ``config`` every ``storage.sweep_interval_s`` in a daemon thread.

    Usage::

        sweeper = RetentionSweeper(config).start()   # sweeps now, then on every interval
        sweeper.stop()
    """

    def __init__(self, config: AppConfig):
        self.config = config
        self.results = ResultStore.of(config.storage)
        self.interval_s = config.storage.sweep_interval_s
        deadlines = [config.limits.request_deadline_s, *(t.request_deadline_s or 0 for t in config.tenants.values())]
        self.orphaned_after_s = max(ORPHANED_UPLOAD_S, *deadlines)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention-sweeper", daemon=True)

    def start(self) -> RetentionSweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def sweep(self) -> None:
        """One sweep of everything, now."""
        self.results.sweep()
        sweep_wsi(self.config.wsi)
        self._sweep_orphaned_uploads()
        self.results.index_existing()  # after the results' sweep: the expired are not indexed; then a stat each time

    def _run(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception as e:  # storage briefly unreachable: the next sweep tries again
                logger.warning("retention sweep failed (%s); trying again in %g s", type(e).__name__, self.interval_s)
            if self._stopped.wait(self.interval_s):
                return

    def _sweep_orphaned_uploads(self) -> None:
        cutoff = time.time() - self.orphaned_after_s
        for folder in self.config.storage.uploads.iterdir():
            try:
                orphaned = folder.is_dir() and folder.stat().st_mtime < cutoff
            except FileNotFoundError:  # its request ended meanwhile
                continue
            if orphaned:
                shutil.rmtree(folder, ignore_errors=True)
