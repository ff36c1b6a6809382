"""A slide's tumour-probability heatmap on disk, written chunk by chunk so a killed job loses nothing.

A job classifies a slide one *work unit* at a time: a square block of ``chunk_tiles`` × ``chunk_tiles``
model tiles. Each unit's probabilities fill exactly one chunk of a Zarr array at tile resolution, so a
unit's write touches one file and units finished by different workers never contend. Next to the data
lies a ledger of finished chunks, one empty marker file each, and a resubmitted job skips what it lists.

The order of the two writes is the whole guarantee: a chunk's data is written and flushed to disk first,
its marker created after. A job killed at any instant therefore leaves every listed chunk complete, and
at worst one unlisted chunk whose data is already there; redoing that chunk rewrites the same values, so
the resumed heatmap is identical to an uninterrupted run's. The ledger does not look at chunk files:
Zarr writes none for a chunk that is all fill value (NaN: no tissue), and such chunks are finished too.

On disk, ``<slide>/heatmap.zarr/`` is a plain Zarr (format 3) array that any Zarr reader opens; the ledger
is its ``finished-chunks/`` folder, inside the array's folder so that deleting the heatmap deletes the
ledger with it (a ledger that outlived its data would make a resumed job skip chunks that are gone).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr

__all__ = ["HeatmapStore"]

LEDGER_FOLDER = "finished-chunks"
_MARKER_NAME = re.compile(r"^(\d+)\.(\d+)$")  # "<chunk_row>.<chunk_col>"


class HeatmapStore:
    """One slide's tumour-probability heatmap on disk, written chunk by chunk as a job finishes them.

    The array is ``(rows, cols)`` float32 at tile resolution: one value per model tile, tile ``(r, c)``
    covering level-0 pixels ``y in [r*e, (r+1)*e)``, ``x in [c*e, (c+1)*e)`` with ``e`` the tile's extent
    at level 0; NaN where there is no tissue or the tile is not classified yet. It is chunked
    ``(chunk_tiles, chunk_tiles)``, and chunk ``(i, j)`` holds tiles ``[i*chunk_tiles, (i+1)*chunk_tiles)``
    down and ``[j*chunk_tiles, (j+1)*chunk_tiles)`` across, clipped at the bottom and right edges.

    Open one with :meth:`open`; several threads may write different chunks of one store at once.
    """

    def __init__(self, path: Path, array: zarr.Array) -> None:
        # Use HeatmapStore.open: it checks that an existing store is the one the caller means.
        self.path = Path(path)
        self._array = array
        self.rows, self.cols = (int(n) for n in array.shape)
        self.chunk_tiles = int(array.chunks[0])
        self._ledger = self.path / LEDGER_FOLDER

    @classmethod
    def open(cls, path: Path, *, rows: int, cols: int, chunk_tiles: int, attributes: dict) -> HeatmapStore:
        """Create the store at ``path`` (a ``heatmap.zarr`` folder), or reopen the one already there.

        ``attributes`` (JSON-serialisable: level, tile size, mpp, model name and version, slide name...)
        are stored as the Zarr array's attributes. A store already at ``path`` is reopened only if its
        shape, chunks and attributes are the ones given: otherwise it holds another slide's, model's or
        grid's heatmap, and ``ValueError`` says what differs rather than mixing two runs' tiles.
        """
        if rows < 0 or cols < 0:
            raise ValueError(f"a heatmap has at least 0 rows and columns, not {rows} x {cols}")
        if chunk_tiles < 1:
            raise ValueError(f"chunk_tiles must be at least 1, not {chunk_tiles}")
        path = Path(path)
        # Attributes come back from disk as JSON (tuples as lists...): compare like with like.
        attributes = json.loads(json.dumps(attributes))
        if not (path / "zarr.json").exists():
            _create_atomically(path, rows=rows, cols=cols, chunk_tiles=chunk_tiles, attributes=attributes)
        try:
            array = zarr.open_array(store=path, mode="r+")
        except Exception as error:
            raise ValueError(f"{path} is not a readable heatmap store: {error}") from error
        differences = _differences(array, shape=(rows, cols), chunks=(chunk_tiles, chunk_tiles), attributes=attributes)
        if differences:
            raise ValueError(
                f"{path} already holds another heatmap ({'; '.join(differences)}): "
                "use another output folder, or delete it to start again"
            )
        return cls(path, array)

    @property
    def chunk_grid(self) -> tuple[int, int]:
        """(chunks down, chunks across): the edge chunks may hold fewer tiles."""
        return math.ceil(self.rows / self.chunk_tiles), math.ceil(self.cols / self.chunk_tiles)

    @property
    def attributes(self) -> dict:
        """The attributes the store was created with, as stored (JSON types)."""
        return dict(self._array.attrs)

    def tiles_of_chunk(self, chunk_row: int, chunk_col: int) -> tuple[slice, slice]:
        """The (rows, cols) slices of the heatmap that chunk ``(chunk_row, chunk_col)`` holds."""
        down, across = self.chunk_grid
        if not (0 <= chunk_row < down and 0 <= chunk_col < across):
            raise IndexError(f"chunk ({chunk_row}, {chunk_col}) is outside the {down} x {across} chunk grid")
        n = self.chunk_tiles
        return (
            slice(chunk_row * n, min((chunk_row + 1) * n, self.rows)),
            slice(chunk_col * n, min((chunk_col + 1) * n, self.cols)),
        )

    def finished_chunks(self) -> set[tuple[int, int]]:
        """The (chunk_row, chunk_col) of every chunk recorded finished, by this run or an earlier one."""
        if not self._ledger.is_dir():
            return set()
        finished = set()
        for name in os.listdir(self._ledger):
            match = _MARKER_NAME.match(name)
            if match:
                finished.add((int(match[1]), int(match[2])))
        return finished

    def unfinished_chunks(self) -> list[tuple[int, int]]:
        """The chunks still to do, row by row: what a resumed job works on."""
        finished = self.finished_chunks()
        down, across = self.chunk_grid
        return [(i, j) for i in range(down) for j in range(across) if (i, j) not in finished]

    def is_complete(self) -> bool:
        """Whether every chunk is recorded finished."""
        return not self.unfinished_chunks()

    def write_chunk(self, chunk_row: int, chunk_col: int, probabilities: np.ndarray) -> None:
        """Write one chunk's probabilities and record it finished.

        ``probabilities`` is ``(h, w)`` float32 (other float types are converted), ``h, w`` the chunk's
        extent in tiles (smaller at the bottom and right edges; see :meth:`tiles_of_chunk`); NaN where a
        tile has no tissue. Rewriting a finished chunk is allowed and gives the same result.
        """
        rows, cols = self.tiles_of_chunk(chunk_row, chunk_col)
        expected = (rows.stop - rows.start, cols.stop - cols.start)
        probabilities = np.asarray(probabilities)
        if probabilities.shape != expected:
            raise ValueError(
                f"chunk ({chunk_row}, {chunk_col}) holds {expected[0]} x {expected[1]} tiles, not {probabilities.shape}"
            )
        self._array[rows, cols] = probabilities.astype(np.float32, copy=False)
        # The data must be on disk before the marker: after a power cut, a marker whose data was still in
        # the page cache would make the resumed job skip a chunk that is not there.
        self._flush_chunk_file(chunk_row, chunk_col)
        self._ledger.mkdir(exist_ok=True)
        # An empty file's existence is the record: creating it is atomic, whatever instant the job dies.
        (self._ledger / f"{chunk_row}.{chunk_col}").touch()

    def read(self) -> np.ndarray:
        """The whole heatmap, ``(rows, cols)`` float32; NaN for tiles without tissue.

        Chunks not recorded finished read as NaN even if a killed run wrote part of them, so what is read
        is always what the ledger vouches for.
        """
        heatmap = np.asarray(self._array[...], dtype=np.float32)
        finished = self.finished_chunks()
        down, across = self.chunk_grid
        for i in range(down):
            for j in range(across):
                if (i, j) not in finished:
                    heatmap[self.tiles_of_chunk(i, j)] = np.nan
        return heatmap

    def _flush_chunk_file(self, chunk_row: int, chunk_col: int) -> None:
        # Zarr writes a chunk file under a temporary name and renames it into place, but does not fsync.
        # An all-NaN chunk may have no file at all (Zarr skips chunks equal to the fill value).
        chunk_file = self.path / self._array.metadata.encode_chunk_key((chunk_row, chunk_col))
        try:
            _fsync(chunk_file)
        except FileNotFoundError:
            return
        _fsync(chunk_file.parent)  # the rename that put the file there


def _create_atomically(path: Path, *, rows: int, cols: int, chunk_tiles: int, attributes: dict) -> None:
    """Create the array in a temporary folder and rename it into place: a job killed while creating the
    store leaves no half-written metadata, and of two jobs creating the same store, one wins."""
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} exists and is not a heatmap store (it has no zarr.json)")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.{uuid.uuid4().hex}.creating"
    zarr.create_array(
        store=staging,
        shape=(rows, cols),
        chunks=(chunk_tiles, chunk_tiles),
        dtype="float32",
        fill_value=np.nan,
        attributes=attributes,
        zarr_format=3,
    )
    try:
        os.rename(staging, path)  # replaces an empty folder; fails if another job created the store first
    except OSError:
        if not (path / "zarr.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _fsync(path.parent)


def _differences(array: zarr.Array, *, shape: tuple, chunks: tuple, attributes: dict) -> list[str]:
    """What differs between the stored array and the one asked for, in words."""
    differences = []
    if tuple(array.shape) != shape:
        differences.append(f"shape {tuple(array.shape)} on disk, {shape} asked for")
    if tuple(array.chunks) != chunks:
        differences.append(f"chunks {tuple(array.chunks)} on disk, {chunks} asked for")
    if array.dtype != np.float32:
        differences.append(f"dtype {array.dtype} on disk, float32 asked for")
    stored = dict(array.attrs)
    for key in sorted(stored.keys() | attributes.keys()):
        if key not in attributes:
            differences.append(f"attribute {key!r} = {stored[key]!r} on disk, not given")
        elif key not in stored:
            differences.append(f"attribute {key!r} not on disk, {attributes[key]!r} given")
        elif stored[key] != attributes[key]:
            differences.append(f"attribute {key!r} = {stored[key]!r} on disk, {attributes[key]!r} given")
    return differences


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
