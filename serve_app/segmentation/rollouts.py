"""Rollouts: a model's candidate version in front of its traffic, in shadow or as a canary, until it is promoted or
aborted (docs/rollouts.md).

A rollout is the ``rollouts.<model>`` section of the config; its id is a digest of that section, so changing it
starts a new rollout. Its state (running, promoted, aborted, and why) and the record of every study it routed live
in the shared storage, ``<storage.root>/rollouts/<application>/<model>/``, the one place every ingress replica of a
multi-node cluster, a replica started after another died, and ``medserve rollout promote|abort`` all see:

    state.json                 {"rollout_id", "state", "reason", "changed_at", "changed_by"}; absent: running
    runs-<rollout id>.jsonl    one line per study: its role (live, shadow, canary), outcome, agreement
    runs-<rollout id>.lock     taken (flock) around every append to the runs file and every compaction of it

Each ingress replica rereads ``state.json`` when its modification time changes (one ``stat`` per request), and
judges the abort thresholds from the abort windows after each candidate run.

The runs file is bounded: once it holds more than ``COMPACT_FACTOR`` times the larger abort window of records, the
replica that appended the last one rewrites it (aside, fsync, rename) as one ``{"totals": {role: {outcome: n}}}``
line, the running counts of the records it folds, followed by the records the abort windows still need (the last
``agreement_window`` shadowed studies with an agreement, the last ``error_window`` candidate runs). A rollout's counts
are the totals plus the records left; its windows, and so its abort decisions, are exactly those of the whole history.

An append reads nothing it has read before: each replica keeps, per rollout, a mirror of the runs file as it last
saw it under the lock (its records since the last compaction, its totals, both abort windows) with the file's inode,
size and modification time. An append whose ``fstat`` finds the file as this replica left it reads nothing; one
that finds it grown reads only the lines other replicas appended; one that finds another file (another replica
compacted it) reads it whole, at most both windows' records. Compacting is decided, and done, from the mirror.

A tile_classification model's rollout is a shadow of WSI jobs' slides: the job's driver runs the candidate on each
slide the live version finished (``serve_app/wsi/job_driver.py``) and records the slide's heatmap agreement, whose
tumour-mask Dice is its ``mean_dice``.

Usage, in ``SegmentationService``::

    rollout = rollouts.of(model)                  # None: the model has no rollout
    spec, role = rollout.route(identity)          # the version that answers this study, live or canary
    if rollout.shadows(identity): ...             # the candidate also runs on it, beside the live answer
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NamedTuple

import pydicom
from pydantic import BaseModel, Field

from serve_app.config import AppConfig, ConfigError, RolloutConfig
from serve_app.config.rollout import RolloutAbortConfig, RolloutMode
from serve_app.durable import write_durably
from serve_app.errors import NoRollout
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import ModelSpec
from serve_app.observability import metrics
from serve_app.storage import private_folder, write_atomic
from serve_app.tenancy.audit import AuditLog

__all__ = [
    "Rollout",
    "RolloutCounts",
    "RolloutLedger",
    "RolloutReport",
    "RolloutRuns",
    "RolloutState",
    "RolloutWindows",
    "Rollouts",
    "check_rollouts",
    "content_identity",
    "rollout_id",
    "study_identity",
]

logger = logging.getLogger("ray.serve")
RolloutStateName = Literal["running", "promoted", "aborted"]
_STATE_FILE = "state.json"
# A study's identity from files other than DICOM (NIfTI): a digest of at most this much of each of its files.
_IDENTITY_BYTES = 1024 * 1024
# The runs file is compacted once it holds more records than this times the larger abort window: a compaction keeps
# at most both windows' records, so at least twice a window of appends pass between two compactions (amortised O(1)).
COMPACT_FACTOR = 4


def rollout_id(model: str, config: RolloutConfig) -> str:
    """The id of ``model``'s rollout as ``config`` describes it: a new section, a new rollout."""
    return hashlib.sha256(f"{model}\n{config.model_dump_json()}".encode()).hexdigest()[:16]


def check_rollouts(config: AppConfig, repository: ModelRepository) -> None:
    """``ConfigError`` naming the field and the value for a rollout whose model or versions the repository does not
    serve; at start, before anything is deployed."""
    for model, rollout in config.rollouts.items():
        if model not in repository.names():
            raise ConfigError(
                f"rollouts.{model}: model {model!r} is not in the repository ({', '.join(repository.names())})"
            )
        task = repository.get(model).task
        if task not in ("segmentation", "tile_classification"):
            raise ConfigError(
                f"rollouts.{model}: {model} is a {task} model: rollouts are of segmentation and tile_classification "
                "models"
            )
        if task == "tile_classification" and rollout.mode != "shadow":
            raise ConfigError(
                f"rollouts.{model}.mode: {rollout.mode!r}: a tile_classification model's rollout is a shadow (a WSI "
                "job's slides all run through one version)"
            )
        served = [spec.version for spec in repository.versions(model)]
        for field, version in (("candidate", rollout.candidate), ("live", rollout.live)):
            if version is not None and version not in served:
                raise ConfigError(
                    f"rollouts.{model}.{field}: version {version!r} of {model} is not in the repository "
                    f"(versions: {', '.join(served)})"
                )
        if rollout.live is None and served == [rollout.candidate]:
            raise ConfigError(
                f"rollouts.{model}.candidate: {rollout.candidate!r} is {model}'s only version: a rollout needs a live "
                "version to answer beside it"
            )


def study_identity(folder: Path) -> str:
    """What makes two uploads the same study, for a sticky choice: the StudyInstanceUID of the first DICOM file found,
    else a digest of the files' sizes and first MiB, whatever they are called. Never logged or stored: only hashed
    with a rollout's id."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:  # not DICOM (a NIfTI, a zip): the digest below
            continue
        uid = header.get("StudyInstanceUID")
        if uid:
            return f"dicom:{uid}"
    return "files:" + content_identity(files)  # by content alone: an upload's files are named by how they were sent


def content_identity(files: list[Path]) -> str:
    """A digest of the files' sizes and first MiB, whatever they are called or wherever they lie: what makes two
    uploads of a study, or two submissions of a slide, the same when no UID says so."""
    digests = []
    for path in files:
        with path.open("rb") as file:
            head = hashlib.sha256(file.read(_IDENTITY_BYTES))
        digests.append(f"{path.stat().st_size}:{head.hexdigest()}")
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def share_of(rollout: str, identity: str) -> float:
    """Where a study falls in [0, 1) for a rollout: the same study always at the same place."""
    return int(hashlib.sha256(f"{rollout}\n{identity}".encode()).hexdigest()[:12], 16) / 16**12


class RolloutState(BaseModel):
    """Where a rollout stands."""

    rollout_id: str = Field(description="The rollout's id: a digest of its config section.")
    state: RolloutStateName = Field(
        description="running: as configured; promoted: the candidate answers every study; aborted: the live "
        "version answers every study and the candidate runs no more."
    )
    reason: str | None = Field(None, description="Why it was aborted or promoted, and by whom or what.")
    changed_at: str | None = Field(None, description="When it was promoted or aborted (UTC, ISO 8601).")


class RolloutCounts(BaseModel):
    """Studies the rollout routed, over every ingress replica, since it started."""

    live: int = Field(description="Studies the live version answered.")
    shadow: int = Field(description="Shadow runs of the candidate that finished (agreement recorded).")
    shadow_errors: int = Field(description="Shadow runs of the candidate that failed with a server error.")
    dropped: int = Field(description="Studies not shadowed because the replica's shadow runs were all busy.")
    canary: int = Field(description="Studies the candidate answered as a canary.")
    canary_errors: int = Field(description="Canary studies that failed with a server error.")


class RolloutReport(BaseModel):
    """``GET /v1/models/{name}/rollout``: a model's rollout, what it measured, and where it stands."""

    model: str = Field(description="The model's name.")
    rollout_id: str = Field(description="The rollout's id: a digest of its config section (a new section, a new id).")
    mode: RolloutMode = Field(description="shadow or canary.")
    live: str = Field(description="The live version.")
    candidate: str = Field(description="The candidate version.")
    fraction: float | None = Field(description="Shadow: the fraction of studies the candidate also runs on.")
    weight: float | None = Field(description="Canary: the percentage of studies the candidate answers.")
    state: RolloutStateName = Field(description="running, promoted or aborted.")
    reason: str | None = Field(description="Why it was promoted or aborted; null while running.")
    changed_at: str | None = Field(description="When it was promoted or aborted (UTC); null while running.")
    counts: RolloutCounts = Field(description="Studies it routed, by role and outcome.")
    window_studies: int = Field(description="Shadowed studies in the agreement window (at most agreement_window).")
    mean_dice: float | None = Field(
        description="Mean Dice between the candidate's masks and the live ones over the agreement window (a tile "
        "model's: of the slides' thresholded tumour masks); null before the first shadowed study."
    )
    mean_volume_difference_ml: dict[str, float] = Field(
        description="Per label, the mean of candidate minus live volume (mL) over the agreement window."
    )
    mean_heatmap_difference: float | None = Field(
        None,
        description="A tile model's: the mean, over the agreement window's slides, of the mean absolute difference "
        "of the candidate's and the live tumour probabilities; null for a segmentation model.",
    )
    mean_tumour_area_difference_mm2: float | None = Field(
        None,
        description="A tile model's: the mean of candidate minus live tumour area (mm²) over the agreement window; "
        "null for a segmentation model.",
    )
    mean_tumour_area_relative_difference: float | None = Field(
        None,
        description="A tile model's: the mean of that difference over the live tumour area, over the window's "
        "slides where the live version found tumour; null where none did, and for a segmentation model.",
    )
    error_ratio: float | None = Field(
        description="The fraction of the candidate's runs over the error window that failed with a server error; "
        "null before its first run."
    )
    abort: RolloutAbortConfig = Field(description="The thresholds it aborts itself at.")


class RolloutRuns(NamedTuple):
    """A rollout's run records as the ledger holds them."""

    totals: Counter[tuple[str, str]]  # (role, outcome): studies since the rollout started, the records kept included
    records: list[dict]  # the records kept, oldest first: at least those the abort windows need


class RolloutWindows(NamedTuple):
    """The records a rollout's abort thresholds are judged over, oldest first."""

    agreement: list[dict]  # the last agreement_window shadowed studies with an agreement
    errors: list[dict]  # the candidate's last error_window runs that finished, well or with a server error


@dataclass
class _RunsMirror:
    """One process's copy of a runs file as it last read or wrote it, under the rollout's flock."""

    inode: int
    first_line: bytes  # the file's first line: a compacted file's totals, or the first record; tells rewrites apart
    offset: int  # the bytes parsed, up to the end of the last whole line
    stamp: tuple[int, int, int]  # (inode, size, mtime) right after this process's last look: unchanged, nothing to read
    totals: Counter[tuple[str, str]]
    records: list[dict]  # since the file's last compaction, oldest first
    agreement: deque[dict]
    errors: deque[dict]
    lines: int = 0  # the records' lines and any unreadable ones since the last compaction: what its bound counts

    @classmethod
    def empty(cls, abort: RolloutAbortConfig, found: os.stat_result) -> _RunsMirror:
        return cls(
            inode=found.st_ino,
            first_line=b"",
            offset=0,
            stamp=_stamp(found),
            totals=Counter(),
            records=[],
            agreement=deque(maxlen=abort.agreement_window),
            errors=deque(maxlen=abort.error_window),
        )

    def is_file(self, fd: int, found: os.stat_result) -> bool:
        """Whether the file open at ``fd`` is the one this mirror copies, grown since (another replica appended): the
        same inode, at least as long, and the same first line (an inode reused by a later compaction's file has
        other totals: each compaction folds more records)."""
        if found.st_ino != self.inode or found.st_size < self.offset:
            return False
        return not self.first_line or os.pread(fd, len(self.first_line), 0) == self.first_line

    def take(self, data: bytes) -> None:
        """The bytes that follow ``offset``: each whole line parsed into the mirror, a last line without its newline
        left for the next look (so a line is never half-read)."""
        if b"\n" not in data:
            return
        whole, _, rest = data.rpartition(b"\n")
        if not self.first_line:
            self.first_line = data[: data.index(b"\n") + 1]
        for line in whole.split(b"\n"):
            if line.strip():
                self._take_line(line)
        self.offset += len(data) - len(rest)

    def add(self, record: dict, line: bytes) -> None:
        """This process's own record, just appended as ``line`` at ``offset``."""
        if not self.first_line:
            self.first_line = line
        self.offset += len(line)
        self.lines += 1
        self._count(record)

    def _take_line(self, line: bytes) -> None:
        found = _decoded(line)
        if found is not None and "totals" in found:
            _fold_totals(self.totals, found["totals"])
            return
        self.lines += 1  # a record, or a line that is none: both count towards the compaction bound
        if found is not None:
            self._count(found)

    def _count(self, record: dict) -> None:
        self.records.append(record)
        self.totals[(record["role"], record["outcome"])] += 1
        if _in_agreement_window(record):
            self.agreement.append(record)
        if _in_error_window(record):
            self.errors.append(record)


def _stamp(found: os.stat_result) -> tuple[int, int, int]:
    return found.st_ino, found.st_size, found.st_mtime_ns


class RolloutLedger:
    """One model's rollout state and run records on the shared storage (see the module's docstring).

    Args:
        storage_root, application, model: where its files are.
        abort: the rollout's thresholds, whose windows say which records a compaction of the runs file keeps and
            which ``append`` returns; None (a ledger that only reads or changes the state, as the CLI's): the runs
            file is never compacted, and an append reads nothing.
    """

    def __init__(self, storage_root: Path, application: str, model: str, abort: RolloutAbortConfig | None = None):
        self.folder = Path(storage_root) / "rollouts" / application / model
        self.abort = abort
        self._lock = threading.Lock()
        # This process's mirror of each rollout's runs file; its threads take turns (an append runs on the event
        # loop or in a worker thread), then take the flock that excludes other processes.
        self._runs_lock = threading.Lock()
        self._mirrors: dict[str, _RunsMirror] = {}

    @classmethod
    def of(cls, config: AppConfig, model: str) -> RolloutLedger:
        rollout = config.rollouts.get(model)
        return cls(config.storage.root, config.name, model, rollout.abort if rollout is not None else None)

    @property
    def state_path(self) -> Path:
        return self.folder / _STATE_FILE

    def state(self, rollout: str) -> RolloutState:
        """The state of rollout ``rollout``: running unless it was promoted or aborted."""
        try:
            found = RolloutState.model_validate_json(self.state_path.read_text())
        except (OSError, ValueError):
            found = None
        if found is None or found.rollout_id != rollout:  # none yet, or a former rollout's
            return RolloutState(rollout_id=rollout, state="running")
        return found

    def change(self, rollout: str, state: RolloutStateName, reason: str) -> RolloutState | None:
        """Promote or abort rollout ``rollout``; None (nothing changed) if it is not running."""
        with self._lock:
            if self.state(rollout).state != "running":
                return None
            private_folder(self.folder)
            changed = RolloutState(
                rollout_id=rollout,
                state=state,
                reason=reason,
                changed_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            )
            write_atomic(self.state_path, changed.model_dump_json())
            return changed

    def append(self, rollout: str, record: dict) -> RolloutWindows | None:
        """One study's record, appended in one write; the runs file compacted when it passed its bound. Returns the
        abort windows as they stand after it, every replica's records included (None without ``abort``).

        Every append and every compaction holds an exclusive ``flock`` on the rollout's lock file, over every
        replica of every node (Linux's NFS client maps ``flock`` onto the server's byte-range locks, and revalidates
        a file's attributes when it opens it): a compaction rewrites the file from a mirror brought up to its end and
        renames the rewrite over it with no append in between, so none is lost in the old file. Readers take no lock:
        the rename shows them the old file or the new one, whose counts and windows are equal.
        """
        private_folder(self.folder)
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._runs_lock:
            lock = os.open(self.folder / f"runs-{rollout}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                path = self._runs_path(rollout)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    if self.abort is None:
                        os.write(fd, line)
                        return None
                    mirror = self._mirror(rollout, fd)
                    whole_lines = mirror.offset == os.fstat(fd).st_size  # no half line before this one
                    os.write(fd, line)
                    if whole_lines:
                        mirror.add(record, line)
                        mirror.stamp = _stamp(os.fstat(fd))
                    else:  # appended to a dead writer's half line: read back as the file now is
                        mirror = self._mirror(rollout, fd)
                    if mirror.lines > COMPACT_FACTOR * _largest_window(self.abort):
                        self._compact(path, mirror)
                    return RolloutWindows(list(mirror.agreement), list(mirror.errors))
                finally:
                    os.close(fd)
            finally:
                os.close(lock)  # closing the last descriptor of the open file releases its flock

    def _mirror(self, rollout: str, fd: int) -> _RunsMirror:
        """This process's mirror of the runs file open at ``fd``, brought up to its end; the caller holds the flock.
        Reads nothing when the file is as this process left it, only the lines added when another replica appended,
        and the whole file (at most both windows' records past a compaction) when it is another file."""
        found = os.fstat(fd)
        mirror = self._mirrors.get(rollout)
        if mirror is not None and mirror.stamp == _stamp(found):
            return mirror
        if mirror is None or not mirror.is_file(fd, found):
            mirror = self._mirrors[rollout] = _RunsMirror.empty(self.abort, found)
        mirror.take(_read_from(fd, mirror.offset, found.st_size))
        mirror.stamp = _stamp(found)
        return mirror

    def read(self, rollout: str) -> RolloutRuns:
        """Rollout ``rollout``'s counts and the records kept."""
        try:
            text = self._runs_path(rollout).read_bytes()
        except FileNotFoundError:
            return RolloutRuns(Counter(), [])
        return _parse(text)

    def runs(self, rollout: str) -> list[dict]:
        """The records of rollout ``rollout`` the runs file keeps, oldest first: every one until it is compacted,
        then at least those its abort windows need."""
        return self.read(rollout).records

    def _compact(self, path: Path, mirror: _RunsMirror) -> None:
        """Rewrite the runs file as its totals and the records the windows need, from ``mirror`` (brought up to the
        file's end), and the mirror as the new file; the caller holds the flock."""
        keep = {id(run) for run in (*mirror.agreement, *mirror.errors)}
        kept = [run for run in mirror.records if id(run) in keep]
        folded = mirror.totals - Counter((run["role"], run["outcome"]) for run in kept)
        nested: dict[str, dict[str, int]] = {}
        for (role, outcome), count in sorted(folded.items()):
            nested.setdefault(role, {})[outcome] = count
        lines = [json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in ({"totals": nested}, *kept)]
        data = b"".join(lines)
        write_durably(path, data)
        found = path.stat()  # the new file, which no other process writes while the flock is held
        mirror.inode, mirror.first_line, mirror.offset, mirror.stamp = found.st_ino, lines[0], len(data), _stamp(found)
        mirror.records, mirror.lines = kept, len(kept)

    def _runs_path(self, rollout: str) -> Path:
        return self.folder / f"runs-{rollout}.jsonl"


def _parse(text: bytes) -> RolloutRuns:
    """A runs file's totals (its totals line plus every record) and its records."""
    totals: Counter[tuple[str, str]] = Counter()
    records = []
    for line in text.splitlines():
        found = _decoded(line)
        if found is None:
            continue
        if "totals" in found:
            _fold_totals(totals, found["totals"])
        else:
            records.append(found)
            totals[(found["role"], found["outcome"])] += 1
    return RolloutRuns(totals, records)


def _decoded(line: bytes) -> dict | None:
    """A runs file's line: its totals line or a record; None for a line that is neither (a replica was writing it as
    it died)."""
    try:
        found = json.loads(line)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _fold_totals(totals: Counter[tuple[str, str]], line_totals: dict[str, dict[str, int]]) -> None:
    """Add a totals line's counts (role -> outcome -> studies) to ``totals``."""
    for role, outcomes in line_totals.items():
        totals.update({(role, outcome): count for outcome, count in outcomes.items()})


def _read_from(fd: int, offset: int, end: int) -> bytes:
    """The file's bytes from ``offset`` to ``end``."""
    chunks = []
    while offset < end and (chunk := os.pread(fd, min(end - offset, 1 << 20), offset)):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _largest_window(abort: RolloutAbortConfig) -> int:
    return max(abort.agreement_window, abort.error_window)


def _in_agreement_window(run: dict) -> bool:
    """Whether a record counts in the agreement window: a shadowed study with an agreement."""
    return run["role"] == "shadow" and "mean_dice" in run


def _in_error_window(run: dict) -> bool:
    """Whether a record counts in the error window: a run of the candidate that finished, well or with an error."""
    return run["role"] != "live" and run["outcome"] in ("ok", "error")


def _windows_of(runs: list[dict], abort: RolloutAbortConfig) -> RolloutWindows:
    """The abort windows of a rollout's records, oldest first."""
    agreement = [run for run in runs if _in_agreement_window(run)]
    errors = [run for run in runs if _in_error_window(run)]
    return RolloutWindows(agreement[-abort.agreement_window :], errors[-abort.error_window :])


class Rollout:
    """One model's rollout, as an ingress replica routes it.

    Args:
        model: the model's name.
        config: its ``rollouts.<model>`` section.
        live, candidate: the two versions' specs.
        ledger: its state and records on the shared storage.
        audit: where an abort it decides is audited.
    """

    def __init__(
        self,
        model: str,
        config: RolloutConfig,
        live: ModelSpec,
        candidate: ModelSpec,
        ledger: RolloutLedger,
        audit: AuditLog,
    ):
        self.model, self.config, self.live, self.candidate = model, config, live, candidate
        self.id = rollout_id(model, config)
        self.ledger, self.audit = ledger, audit
        self.shadows_in_flight = 0  # on this replica's event loop only
        self._state = RolloutState(rollout_id=self.id, state="running")
        self._state_seen: tuple[int, int] | None = None

    def state(self) -> RolloutState:
        """Its state, reread when the state file changed (another replica's abort, the CLI's promote)."""
        try:
            found = self.ledger.state_path.stat()
            seen = (found.st_mtime_ns, found.st_ino)
        except FileNotFoundError:
            seen = None
        if seen != self._state_seen:
            self._state, self._state_seen = self.ledger.state(self.id), seen
        return self._state

    @property
    def needs_identity(self) -> bool:
        """Whether routing a study needs its identity: a canary split, or a shadow of only some studies."""
        if self.state().state != "running":
            return False
        return self.config.mode == "canary" or self.config.fraction < 1

    def route(self, identity: str | None) -> tuple[ModelSpec, str]:
        """The version that answers a study, and its role (live or canary)."""
        state = self.state().state
        if state == "promoted":
            return self.candidate, "live"
        if state == "running" and self.config.mode == "canary" and identity is not None:
            if share_of(self.id, identity) < self.config.weight / 100:
                return self.candidate, "canary"
        return self.live, "live"

    def shadows(self, identity: str | None) -> bool:
        """Whether the candidate also runs on a study the live version answers."""
        if self.state().state != "running" or self.config.mode != "shadow":
            return False
        return self.config.fraction >= 1 or (
            identity is not None and share_of(self.id, identity) < self.config.fraction
        )

    def take_shadow_slot(self) -> bool:
        """A place for one more shadow run on this replica; False (the run is dropped, and counted) when all are
        taken: the candidate never queues ahead of live work."""
        if self.shadows_in_flight >= self.config.max_shadow_in_flight:
            self.record({"role": "shadow", "version": self.candidate.version, "outcome": "dropped"})
            return False
        self.shadows_in_flight += 1
        return True

    def release_shadow_slot(self) -> None:
        self.shadows_in_flight -= 1

    def record(self, run: dict, seconds: float | None = None) -> None:
        """One study's record: ``run`` holds its role and outcome (and a shadow's agreement); a candidate's run is
        then judged against the abort thresholds."""
        role, outcome = run["role"], run["outcome"]
        version = run.setdefault("version", self.live.version if role == "live" else self.candidate.version)
        metrics.count_rollout_run(self.model, version, role, outcome, seconds)
        if "mean_dice" in run:
            metrics.observe_rollout_agreement(self.model, version, run["mean_dice"])
        windows = self.ledger.append(self.id, {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **run})
        if role != "live" and outcome != "dropped" and self.state().state == "running":
            if windows is None:  # a ledger that keeps the whole history (no abort windows of its own): from its file
                windows = _windows_of(self.ledger.runs(self.id), self.config.abort)
            reason = self._threshold_crossed(windows)
            if reason is not None:
                self.abort(reason, by="medserve")

    def abort(self, reason: str, by: str) -> RolloutState | None:
        """Every study back to the live version, the candidate run no more; audited. None if it was not running."""
        changed = self.ledger.change(self.id, "aborted", f"{reason} ({by})")
        if changed is not None:
            logger.warning("rollout of %s %s aborted: %s", self.model, self.candidate.version, reason)
            metrics.count_rollout_aborted(self.model, self.candidate.version)
            audit_rollout(self.audit, self.model, self.candidate.version, "aborted", reason, by)
        return changed

    def report(self) -> RolloutReport:
        """What ``GET /v1/models/{name}/rollout`` answers."""
        totals, runs = self.ledger.read(self.id)
        state = self.state()
        counts = RolloutCounts(
            live=totals["live", "ok"],
            shadow=totals["shadow", "ok"],
            shadow_errors=totals["shadow", "error"],
            dropped=totals["shadow", "dropped"],
            canary=totals["canary", "ok"] + totals["canary", "error"],
            canary_errors=totals["canary", "error"],
        )
        window, errors = _windows_of(runs, self.config.abort)
        volumes: dict[str, list[float]] = {}
        for run in window:
            for name, difference in run.get("volume_difference_ml", {}).items():
                volumes.setdefault(name, []).append(difference)
        shadow = self.config.mode == "shadow"
        return RolloutReport(
            model=self.model,
            rollout_id=self.id,
            mode=self.config.mode,
            live=self.live.version,
            candidate=self.candidate.version,
            fraction=self.config.fraction if shadow else None,
            weight=None if shadow else self.config.weight,
            state=state.state,
            reason=state.reason,
            changed_at=state.changed_at,
            counts=counts,
            window_studies=len(window),
            mean_dice=_mean([run["mean_dice"] for run in window]),
            mean_volume_difference_ml={name: round(_mean(values), 3) for name, values in volumes.items()},
            **_heatmap_means(window),
            error_ratio=_mean([run["outcome"] == "error" for run in errors]),
            abort=self.config.abort,
        )

    def _threshold_crossed(self, windows: RolloutWindows) -> str | None:
        """Why the rollout must abort now, or None."""
        thresholds = self.config.abort
        window, errors = windows
        if len(window) >= thresholds.min_studies:
            mean_dice = _mean([run["mean_dice"] for run in window])
            if mean_dice < thresholds.min_mean_dice:
                return (
                    f"mean Dice {mean_dice:.3f} over the last {len(window)} shadowed studies is below "
                    f"abort.min_mean_dice {thresholds.min_mean_dice:g}"
                )
        if len(errors) >= thresholds.min_studies:
            ratio = _mean([run["outcome"] == "error" for run in errors])
            if ratio > thresholds.max_error_ratio:
                return (
                    f"{ratio:.0%} of the candidate's last {len(errors)} runs failed, over abort.max_error_ratio "
                    f"{thresholds.max_error_ratio:g}"
                )
        return None


def audit_rollout(audit: AuditLog, model: str, version: str, event: str, reason: str, by: str) -> None:
    """The audit line of a rollout promoted or aborted."""
    audit.write(
        {"route": "rollout", "event": event, "model": model, "model_version": version, "reason": reason, "by": by}
    )


class Rollouts:
    """The rollouts of one application, by model name, as one ingress replica routes them."""

    def __init__(self, config: AppConfig, repository: ModelRepository, audit: AuditLog):
        self._by_model: dict[str, Rollout] = {}
        for model, rollout in config.rollouts.items():
            candidate = repository.get(model, rollout.candidate)
            live = repository.get(model, rollout.live) if rollout.live else _newest_other(repository, model, candidate)
            ledger = RolloutLedger.of(config, model)
            self._by_model[model] = Rollout(model, rollout, live, candidate, ledger, audit)

    def of(self, model: str) -> Rollout | None:
        """The model's rollout, or None."""
        return self._by_model.get(model)

    def report(self, model: str) -> RolloutReport:
        """The model's rollout's report; ``NoRollout`` (404) for a model without one."""
        rollout = self._by_model.get(model)
        if rollout is None:
            raise NoRollout(f"model {model!r} has no rollout configured (rollouts.{model} in the config)")
        return rollout.report()


def _newest_other(repository: ModelRepository, model: str, candidate: ModelSpec) -> ModelSpec:
    return next(spec for spec in repository.versions(model) if spec.version != candidate.version)


def _heatmap_means(window: list[dict]) -> dict[str, float | None]:
    """The report's means of a tile model's slide agreements (``HeatmapAgreement``) over the agreement window."""
    slides = [run for run in window if "heatmap_mean_abs_difference" in run]
    if not slides:
        return {}
    relative = [run["tumour_area_relative_difference"] for run in slides]
    return {
        "mean_heatmap_difference": _mean([run["heatmap_mean_abs_difference"] for run in slides]),
        "mean_tumour_area_difference_mm2": _mean([run["tumour_area_difference_mm2"] for run in slides]),
        "mean_tumour_area_relative_difference": _mean([value for value in relative if value is not None]),
    }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None
