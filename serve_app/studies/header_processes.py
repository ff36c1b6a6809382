"""Processes that parse a DICOM series' headers for a replica.

pydicom's parser is Python and holds the GIL: a replica reading a 300-file series on its own parses the headers on
one core (about 1 ms a file), however many cores the node has, and its other requests wait meanwhile. A
``HeaderProcesses`` splits the files into one run of consecutive files a process and parses the runs at once.
What comes back is small and plain (``dicom_series._ImageFile``): pickling pydicom datasets would cost as much as
parsing them.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

__all__ = ["HeaderProcesses"]

logger = logging.getLogger(__name__)

File = TypeVar("File")
Parsed = TypeVar("Parsed")

# Fewer files than this a process are parsed where they are: sending them costs more than it saves.
MIN_FILES_PER_PROCESS = 16


class HeaderProcesses:
    """``processes`` worker processes, spawned (a replica's CUDA context and threads must not be forked into them),
    started on first use or by ``warm_up``.

    Usage::

        parsers = HeaderProcesses(4)
        volume = read_dicom_series(paths, limits, parsers)
        parsers.close()

    A worker that dies (killed, out of memory) breaks the pool: the files in hand are then parsed where they are,
    and a new pool is started for the next series.
    """

    def __init__(self, processes: int):
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    def map(self, parse: Callable[[list[File]], list[Parsed]], files: list[File]) -> list[Parsed]:
        """``parse(files)``, run on consecutive runs of ``files`` in the processes; results in ``files``' order.

        ``parse`` must be a module-level function (it is sent by name). Its errors are raised here.
        """
        runs = min(self.processes, len(files) // MIN_FILES_PER_PROCESS)
        if runs < 2:
            return parse(files)
        bounds = [len(files) * i // runs for i in range(runs + 1)]
        pool = self._started()
        try:
            futures = [pool.submit(parse, files[a:b]) for a, b in itertools.pairwise(bounds)]
            return [item for future in futures for item in future.result()]
        except BrokenProcessPool:
            logger.warning("a DICOM header process died; parsing this series in the replica, restarting the pool")
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            return parse(files)

    def warm_up(self) -> None:
        """Start every process now (each imports pydicom once), so that the first series does not wait for them."""
        pool = self._started()
        for future in [pool.submit(_imported) for _ in range(self.processes)]:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
        return self._pool


def _imported() -> None:
    import serve_app.studies.dicom_series  # noqa: F401  what every parse needs, imported once a process
