"""``ResultIndex``: each tenant's results by the time they were made, newest first, for the review worklist.

A result is indexed when its request commits it (``ResultStore.commit``): one small JSON entry under its tenant and
the day it was made, named by the time of day and the result's id::

    <index root>/<tenant>/<YYYYMMDD>/<HHMMSSffffff>-<result id>.json     {"model", "version", "role", ...}
    <index root>/<tenant>/pairs/<live result id>/<shadow result id>.json  a shadow candidate beside its live result

so that a name sorts as the time it stands for, and a tenant's newest results are read from its newest day's
folder without opening another tenant's results or any older day's. Listing newest first from a cursor costs
the listing of the tenant's day folders (at most the retention period's days), then of one day at a time, and one
read per entry looked at: bounded by the caller's scan budget, never by the number of results stored.

An entry is deleted by ``sweep`` once its result's retention has passed (its name says when it was made); a reader
checks its result still exists, as a result may be deleted first.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.storage import private_folder

__all__ = ["CURSOR_PATTERN", "IndexEntry", "ResultIndex", "RolloutRole"]

RolloutRole = Literal["live", "shadow", "canary"]
# A position in a tenant's index: the day's folder and the entry's name without its suffix.
CURSOR_PATTERN = r"^\d{8}/\d{12}-[0-9a-f]{32}$"
_DAY = re.compile(r"^\d{8}$")
_ENTRY_SUFFIX = ".json"
_PAIRS = "pairs"


class IndexEntry(BaseModel):
    """What the index keeps of a result: enough to filter a worklist without opening the result."""

    model_config = ConfigDict(extra="ignore")

    result_id: str = Field(description="The result's id.")
    created_at: datetime = Field(description="When the result was made (UTC).")
    model: str | None = Field(None, description="The model that made it; null for a result stored without it.")
    version: str | None = Field(None, description="That model's version.")
    role: RolloutRole | None = Field(None, description="Its part in a rollout of the model; null outside one.")
    paired_result_id: str | None = Field(None, description="A shadow result's live result.")

    @property
    def key(self) -> str:
        """Its position in the tenant's index: a cursor, sorting as the time it was made."""
        return f"{self.created_at:%Y%m%d}/{self.created_at:%H%M%S%f}-{self.result_id}"


class ResultIndex:
    """The index under ``root`` (created 0700; entries are 0600 under the replicas' umask)."""

    def __init__(self, root: Path):
        self.root = private_folder(root)

    def add(self, tenant_id: str, entry: IndexEntry) -> None:
        """Index the tenant's result; a shadow result is also listed beside its live result."""
        entry = entry.model_copy(update={"created_at": entry.created_at.astimezone(UTC)})
        day, name = entry.key.split("/")
        _write(self.root / tenant_id / day / f"{name}{_ENTRY_SUFFIX}", entry)
        if entry.role == "shadow" and entry.paired_result_id:
            pair = self.root / tenant_id / _PAIRS / entry.paired_result_id / f"{entry.result_id}{_ENTRY_SUFFIX}"
            _write(pair, entry)

    def has(self, tenant_id: str, entry: IndexEntry) -> bool:
        day, name = entry.key.split("/")
        return (self.root / tenant_id / day / f"{name}{_ENTRY_SUFFIX}").is_file()

    def newest_first(self, tenant_id: str, before: str | None = None) -> Iterator[IndexEntry]:
        """The tenant's entries, newest first, from just after the cursor ``before`` (an entry's ``key``) when
        given. Lazily: one day's names in memory at a time."""
        tenant = self.root / tenant_id
        if not tenant.is_dir():
            return
        before_day, before_name = before.split("/") if before else (None, None)
        days = sorted((p.name for p in os.scandir(tenant) if _DAY.match(p.name)), reverse=True)
        for day in days:
            if before_day is not None and day > before_day:
                continue
            try:
                names = sorted(p.name for p in os.scandir(tenant / day) if p.name.endswith(_ENTRY_SUFFIX))
            except FileNotFoundError:  # swept meanwhile
                continue
            for name in reversed(names):
                if day == before_day and name.removesuffix(_ENTRY_SUFFIX) >= before_name:
                    continue
                entry = _read(tenant / day / name)
                if entry is not None:
                    yield entry

    def candidates_of(self, tenant_id: str, live_result_id: str) -> list[IndexEntry]:
        """The shadow results made beside the tenant's live result, oldest first."""
        folder = self.root / tenant_id / _PAIRS / live_result_id
        if not folder.is_dir():
            return []
        entries = [_read(path) for path in folder.glob(f"*{_ENTRY_SUFFIX}")]
        return sorted((e for e in entries if e is not None), key=lambda e: e.created_at)

    def sweep(self, made_before: datetime) -> None:
        """Delete the entries of results made before ``made_before``: whole days at once, then the day it falls in
        entry by entry (their names say when), and the pairs of those results."""
        day_cut = f"{made_before.astimezone(UTC):%Y%m%d}"
        name_cut = f"{made_before.astimezone(UTC):%H%M%S%f}"
        for tenant in [p for p in self.root.iterdir() if p.is_dir()]:
            for day in [p for p in tenant.iterdir() if _DAY.match(p.name)]:
                if day.name < day_cut:
                    shutil.rmtree(day, ignore_errors=True)
                elif day.name == day_cut:
                    for entry in day.glob(f"*{_ENTRY_SUFFIX}"):
                        if entry.name < name_cut:
                            entry.unlink(missing_ok=True)
            pairs = tenant / _PAIRS
            if pairs.is_dir():
                for folder in pairs.iterdir():
                    for path in folder.glob(f"*{_ENTRY_SUFFIX}"):
                        entry = _read(path)
                        if entry is None or entry.created_at < made_before:
                            path.unlink(missing_ok=True)
                    try:
                        folder.rmdir()  # only once empty
                    except OSError:
                        pass


def _write(path: Path, entry: IndexEntry) -> None:
    """Written aside and renamed: a reader sees the whole entry or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(entry.model_dump_json())
    partial.rename(path)


def _read(path: Path) -> IndexEntry | None:
    """The entry, or None if it was swept meanwhile or cannot be read (a later commit rewrites it whole)."""
    try:
        return IndexEntry.model_validate_json(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
