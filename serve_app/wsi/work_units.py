"""What a WSI job sends to the tile model's replicas, and what comes back: host arrays only.

A work unit is a block of ``chunk_tiles`` x ``chunk_tiles`` model tiles of one slide: the replica reads
the block's region once (aligned to the file's tiles), classifies its tissue tiles and returns their
probabilities. Pixels never cross a deployment boundary, only paths (or PACS series) going out and probabilities coming
back; each unit is one chunk of the slide's Zarr heatmap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve_app.wsi.slides import DicomwebSlide
from serve_app.wsi.tiling import TileGrid

__all__ = ["ChunkProbabilities", "SlideSource", "TileChunk"]

# What a job reads for one slide: the real path of a file or folder, checked against the slide roots; or a DICOM WSI
# series on a configured PACS the tenant may use.
SlideSource = str | DicomwebSlide


@dataclass(frozen=True)
class TileChunk:
    """One work unit.

    Attributes:
        slide: the slide's real path, already checked against the slide roots, or its series on a PACS.
        mpp: the job's microns per pixel for a slide whose file does not say; None to use the file's.
        grid: the slide's tile grid (level, tile size, scale).
        chunk_row, chunk_col: the unit's place in the grid of chunks.
        chunk_tiles: tiles per side of a full unit.
        tissue: (h, w) bool, the unit's tiles (h, w <= chunk_tiles at the grid's edges); True ones are classified.
    """

    slide: SlideSource
    mpp: float | None
    grid: TileGrid
    chunk_row: int
    chunk_col: int
    chunk_tiles: int
    tissue: np.ndarray

    @property
    def rows(self) -> range:
        top = self.chunk_row * self.chunk_tiles
        return range(top, top + self.tissue.shape[0])

    @property
    def cols(self) -> range:
        left = self.chunk_col * self.chunk_tiles
        return range(left, left + self.tissue.shape[1])


@dataclass(frozen=True)
class ChunkProbabilities:
    """A classified work unit.

    Attributes:
        chunk_row, chunk_col: which unit.
        probabilities: (h, w) float32, each tissue tile's probability of the model's label 1; NaN elsewhere.
        read_s: seconds reading and decoding the unit's region.
        inference_s: seconds in the tile classifier.
    """

    chunk_row: int
    chunk_col: int
    probabilities: np.ndarray
    read_s: float
    inference_s: float
