"""Where the tissue is on a slide: a low-resolution mask, and the fraction of each model tile it covers.

Most of a slide is glass; running the model only on tiles with tissue is most of a WSI job's speed.
Stained tissue is coloured and glass is grey-white, so the mask thresholds HSV saturation (Otsu's
threshold, never below ``MIN_SATURATION`` so that a blank slide's noise and JPEG colour fringes stay
glass), drops specks smaller than ``min_object_um2`` (dust, debris) and fills small holes. It is made on
a coarse level (about 8 microns per pixel): a 50 000 px slide's mask is then a few thousand pixels across.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from serve_app.observability.input_features import stain_optical_densities
from serve_app.wsi.slides import Slide, read_level_reduced
from serve_app.wsi.tiling import TileGrid

__all__ = ["MIN_SATURATION", "TissueMask", "detect_tissue"]

# Glass under a brightfield scanner has saturation ~0.00-0.03 (JPEG noise included); H&E tissue 0.15-0.6.
MIN_SATURATION = 0.07
# The mask is computed on at most this many pixels along the longer side: bounded time and memory.
_MAX_MASK_SIDE = 8192


@dataclass(frozen=True, eq=False)  # an array: compared by identity
class TissueMask:
    """Tissue on a slide, on a grid of ``mpp`` pixels whose origin is level 0's top-left."""

    mask: np.ndarray  # (H, W) bool, True = tissue
    mpp: float  # microns per pixel of the mask
    # Mean haematoxylin and eosin optical densities of the tissue's pixels (input monitoring); None: no tissue.
    stain_od: tuple[float, float] | None = None

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the mask's pixels that are tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def tile_fractions(self, grid: TileGrid) -> np.ndarray:
        """(grid.rows, grid.cols) float32 in [0, 1]: the fraction of each tile's area that is tissue.

        Exact area overlap in microns between the tiles and the mask's pixels (separable: tiles and
        pixels are both axis-aligned boxes); beyond the mask counts as glass.
        """
        tile_um = grid.tile_extent * grid.level.mpp
        rows = _overlap_matrix(grid.rows, tile_um, self.mask.shape[0], self.mpp)  # (rows, H)
        cols = _overlap_matrix(grid.cols, tile_um, self.mask.shape[1], self.mpp)  # (cols, W)
        covered = rows @ self.mask.astype(np.float32) @ cols.T  # µm² of tissue per tile
        return np.clip(covered / np.float32(tile_um * tile_um), 0.0, 1.0).astype(np.float32)


def _overlap_matrix(n_tiles: int, tile_um: float, n_pixels: int, pixel_um: float) -> np.ndarray:
    """(n_tiles, n_pixels) float32: microns of overlap between tile i's and pixel j's intervals on one axis."""
    tile_start = np.arange(n_tiles, dtype=np.float64)[:, None] * tile_um
    pixel_start = np.arange(n_pixels, dtype=np.float64)[None, :] * pixel_um
    overlap = np.minimum(tile_start + tile_um, pixel_start + pixel_um) - np.maximum(tile_start, pixel_start)
    return np.maximum(overlap, 0.0).astype(np.float32)


def detect_tissue(slide: Slide, *, target_mpp: float = 8.0, min_object_um2: float = 10_000.0) -> TissueMask:
    """The tissue mask of ``slide`` at about ``target_mpp`` microns per pixel.

    Read from the level closest to ``target_mpp`` and, when that level is much finer, box-averaged down
    to it. A blank (all-glass) slide gives an all-False mask.
    """
    level = min(slide.levels, key=lambda candidate: abs(math.log(candidate.mpp / target_mpp)))
    # A level finer than the target is reduced by a whole factor, and at least enough to bound the mask.
    factor = max(1, math.floor(target_mpp / level.mpp), math.ceil(max(level.width, level.height) / _MAX_MASK_SIDE))
    rgb = read_level_reduced(slide, level.index, factor)  # band by band: bounded memory
    mask_mpp = level.mpp * factor
    saturation = _saturation(rgb)
    mask = saturation > _saturation_threshold(saturation)
    min_pixels = max(1, round(min_object_um2 / mask_mpp**2))
    # max_size: objects (holes) of at most this many pixels are removed (filled).
    mask = remove_small_objects(mask, max_size=min_pixels - 1) if min_pixels > 1 else mask
    mask = remove_small_holes(mask, max_size=min_pixels - 1) if min_pixels > 1 else mask
    # The stain statistics of input monitoring, from the pixels already read: a sub-sample of the tissue's.
    stain_od = stain_optical_densities(rgb, mask)
    return TissueMask(mask=np.ascontiguousarray(mask, dtype=bool), mpp=mask_mpp, stain_od=stain_od)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """(H, W) float32 HSV saturation in [0, 1] of (H, W, 3) uint8 RGB, lightly smoothed against JPEG noise."""
    # Channel by channel: numpy's reduction along a last axis of 3 is about ten times slower (1.6 s on the
    # 3750 px mask level of a 60,000 px slide).
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = np.maximum(np.maximum(red, green), blue).astype(np.float32)
    low = np.minimum(np.minimum(red, green), blue).astype(np.float32)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    return ndimage.uniform_filter(saturation, size=3, mode="nearest")


def _saturation_threshold(saturation: np.ndarray) -> float:
    """Otsu's threshold on saturation, at least ``MIN_SATURATION``; on a near-constant image just the floor."""
    if saturation.size == 0 or float(saturation.max() - saturation.min()) < 1e-3:
        return MIN_SATURATION
    return max(MIN_SATURATION, float(threshold_otsu(saturation)))
