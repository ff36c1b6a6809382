"""``Stopwatch``: the one way medserve times the stages of a request."""

from __future__ import annotations

import time

__all__ = ["Stopwatch"]


class Stopwatch:
    """Seconds since it started, and between laps, on ``time.perf_counter``.

    Usage::

        watch = Stopwatch()
        await spool(...)
        watch.lap("upload")  # seconds since the start (or the last lap), kept in watch.laps["upload"]
        ...
        watch.total_s  # seconds since the start
    """

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def lap(self, name: str | None = None) -> float:
        """Seconds since the last lap; added to ``laps[name]`` when named (a name may recur)."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        if name is not None:
            self.laps[name] = self.laps.get(name, 0.0) + seconds
        return seconds

    @property
    def total_s(self) -> float:
        return time.perf_counter() - self._start
