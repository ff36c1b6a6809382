"""The grid of model tiles over a slide, and reads of whole blocks of them in one aligned region read.

A model sees square tiles of ``tile_size`` pixels at its own mpp (microns per pixel). The grid is laid
on the pyramid level that serves that mpp best: one within ``tolerance`` of it is read as is (scale
1.0); otherwise the coarsest level finer than the model's, read over a larger extent and downsampled
with antialiasing. A slide coarser than the model everywhere cannot serve it.

The grid covers the whole level: the last row and column of tiles reach past the level's edge, and
that part is white (glass), as ``Slide.read_region`` gives it, so no tissue at the edges is dropped.

Blocks of tiles are read with one ``read_region`` over the block's box widened outward to the file's
own tile grid, so each file tile is decoded once per block rather than once per model tile that
touches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from serve_app.errors import InvalidSlide
from serve_app.wsi.slides import Slide, SlideLevel

if TYPE_CHECKING:
    from serve_app.wsi.cuda_regions import CudaRegions

__all__ = ["TileGrid", "plan_grid", "read_tile_block"]


@dataclass(frozen=True)
class TileGrid:
    """Model tiles over a slide: ``rows`` x ``cols`` tiles of ``tile_size`` model pixels at ``mpp``, read
    from ``level``. Tile (row, col) has its top-left at (col, row) * ``tile_extent`` level pixels; the
    last row and column are padded white past the level's edge."""

    level: SlideLevel
    tile_size: int  # model pixels, e.g. 224
    mpp: float  # the model's microns per pixel
    scale: float  # level pixels per model pixel: 1.0 when the level's mpp is within tolerance of the model's
    rows: int  # tiles down: ceil(level.height / tile_extent)
    cols: int  # tiles across: ceil(level.width / tile_extent)

    @property
    def tile_extent(self) -> int:
        """Level pixels one tile spans, each way."""
        return round(self.tile_size * self.scale)

    @property
    def tile_extent_level0(self) -> float:
        """Level-0 pixels one tile spans, each way (for coordinates in the slide's full-resolution frame)."""
        return self.tile_extent * self.level.downsample

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return self.rows, self.cols

    def tile_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) of tile (row, col) in level pixels."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"tile ({row}, {col}) is outside the {self.rows} x {self.cols} grid")
        extent = self.tile_extent
        return col * extent, row * extent, extent, extent

    def tile_box_level0(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(x, y, width, height) of tile (row, col) in level-0 pixels."""
        x, y, width, height = self.tile_box(row, col)
        downsample = self.level.downsample
        return x * downsample, y * downsample, width * downsample, height * downsample


def plan_grid(slide: Slide, *, tile_size: int, mpp: float, tolerance: float = 0.10) -> TileGrid:
    """The grid of ``tile_size`` tiles at ``mpp`` (the model's) over ``slide``, on the level that serves it.

    The level whose mpp is within ``tolerance`` (relative) of ``mpp`` is read as is; if none, the
    coarsest level finer than ``mpp``, downsampled by ``mpp / level.mpp``. ``InvalidSlide`` when every
    level is coarser than the model's mpp.
    """
    if tile_size <= 0 or not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"tile_size and mpp must be positive, got {tile_size} and {mpp}")
    matching = [level for level in slide.levels if abs(level.mpp / mpp - 1) <= tolerance]
    if matching:
        level = min(matching, key=lambda candidate: abs(math.log(candidate.mpp / mpp)))
        scale = 1.0
    else:
        finer = [level for level in slide.levels if level.mpp < mpp]
        if not finer:
            raise InvalidSlide(
                f"the slide's finest level is {slide.levels[0].mpp:g} microns per pixel, coarser than the "
                f"model's {mpp:g}: the model cannot be run on it (was the slide scanned at a lower "
                "magnification, or is its mpp metadata wrong? give --mpp to correct it)"
            )
        level = max(finer, key=lambda candidate: candidate.mpp)
        scale = mpp / level.mpp
    extent = round(tile_size * scale)
    return TileGrid(
        level=level,
        tile_size=tile_size,
        mpp=mpp,
        scale=scale,
        rows=math.ceil(level.height / extent),
        cols=math.ceil(level.width / extent),
    )


def read_tile_block(slide: Slide | CudaRegions, grid: TileGrid, rows: range, cols: range) -> np.ndarray | torch.Tensor:
    """(len(rows), len(cols), tile_size, tile_size, 3) uint8 RGB: the model tiles of a block of the grid.

    One ``read_region`` over the block's box widened to the file's tile grid; resized as one image with
    antialiasing when ``grid.scale != 1`` (a tile's edge pixels then blend with its neighbours', as
    resizing the whole slide would, rather than with nothing). A numpy array from a ``Slide``; a tensor on
    the GPU from ``CudaRegions`` (tiles decoded there).
    """
    if rows.step != 1 or cols.step != 1 or not rows or not cols:
        raise ValueError(f"rows and cols must be non-empty ranges of step 1, got {rows} and {cols}")
    if rows.start < 0 or cols.start < 0 or rows.stop > grid.rows or cols.stop > grid.cols:
        raise IndexError(f"block rows {rows}, cols {cols} is outside the {grid.rows} x {grid.cols} grid")
    level = grid.level
    extent = grid.tile_extent
    x0, y0 = cols.start * extent, rows.start * extent
    x1, y1 = cols.stop * extent, rows.stop * extent
    # Widened outward to whole file tiles, clipped to the level: nothing outside it needs decoding.
    tw, th = level.tile_width, level.tile_height
    ax0, ay0 = (x0 // tw) * tw, (y0 // th) * th
    ax1 = max(min(math.ceil(x1 / tw) * tw, level.width), x0 + 1)
    ay1 = max(min(math.ceil(y1 / th) * th, level.height), y0 + 1)
    aligned = slide.read_region(level.index, ax0, ay0, ax1 - ax0, ay1 - ay0)
    if isinstance(aligned, torch.Tensor):
        block = torch.full((y1 - y0, x1 - x0, 3), 255, dtype=torch.uint8, device=aligned.device)
    else:
        block = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
    inside = aligned[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0]
    block[: inside.shape[0], : inside.shape[1]] = inside
    size = grid.tile_size
    n_rows, n_cols = len(rows), len(cols)
    if extent != size:
        block = _resize(block, (n_rows * size, n_cols * size))
    # (rows*size, cols*size, 3) -> (rows, cols, size, size, 3)
    tiles = block.reshape(n_rows, size, n_cols, size, 3).swapaxes(1, 2)
    return tiles.contiguous() if isinstance(tiles, torch.Tensor) else np.ascontiguousarray(tiles)


def _resize(image: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray | torch.Tensor:
    """(height, width, 3) uint8 RGB resized to ``size`` (height, width), antialiased when reducing.

    torch's bilinear with ``antialias=True`` widens its filter by the reduction factor, as PIL's does, on
    uint8 channels-last directly: about 4x PIL's speed on 2 cores (measured on a 2150 -> 1792 px block).
    """
    on_host = isinstance(image, np.ndarray)
    pixels = (torch.from_numpy(image) if on_host else image).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
    resized = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
    resized = resized[0].permute(1, 2, 0)
    return resized.numpy() if on_host else resized
