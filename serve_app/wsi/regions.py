"""A slide's tumour regions: its heatmap thresholded, each connected patch of tumour tiles one polygon.

A region is a set of tiles whose probability is at least the threshold, joined through their sides (4-connected: two
tiles that touch only at a corner are two regions). Its outline follows the tiles' edges exactly, in level-0 pixel
coordinates (the tile ``(r, c)`` is the square ``[c*e, (c+1)*e] x [r*e, (r+1)*e]``, ``e`` the tile's extent at level
0, as in ``tiles.geojson``), and the tiles it encloses that are not tumour (or not tissue) are its holes. A region
smaller than the minimum area is a speck and left out; its area is its tiles' (holes excluded), in µm², and its
probability the mean of its tiles'.

The outlines are scikit-image's marching squares (``find_contours``) on the region's mask upsampled two-fold, which
puts every vertex within a quarter tile of the tile corner it stands for; rounded to that corner, the outline is the
tiles' own edges. Of a region's contours the one reaching its top row is its outline, the others its holes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import measure

__all__ = ["TumourRegion", "tumour_regions"]


@dataclass(frozen=True)
class TumourRegion:
    """One region: its outline and holes as closed rings of (x, y) level-0 pixel coordinates, (n, 2) float64, the
    first point repeated last; its area in µm² (holes excluded) and each hole's, the mean probability and the count of
    its tiles."""

    outline: np.ndarray
    holes: tuple[np.ndarray, ...]
    area_um2: float
    hole_areas_um2: tuple[float, ...]
    mean_probability: float
    tiles: int


def tumour_regions(
    heatmap: np.ndarray,
    *,
    tile_extent_level0: float,
    tile_um: float,
    threshold: float,
    min_area_um2: float,
) -> list[TumourRegion]:
    """The regions of ``heatmap`` ((rows, cols) float32, NaN where no tissue) whose tiles' probabilities are at least
    ``threshold``, each at least ``min_area_um2``; ``tile_um`` is a tile's side in µm. Largest first."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap is (rows, cols), not {heatmap.shape}")
    if not tile_extent_level0 > 0 or not tile_um > 0:
        raise ValueError("a tile's extent and side are positive")
    tumour = np.isfinite(heatmap) & (heatmap >= threshold)
    labels, _ = ndimage.label(tumour)  # 4-connected: ndimage's default structure is the cross
    regions = []
    for number, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        member = labels[box] == number
        tiles = int(member.sum())
        area_um2 = tiles * tile_um**2
        if area_um2 < min_area_um2:
            continue
        rings = [ring + (box[1].start, box[0].start) for ring in _rings(member)]  # in tiles
        outline = min(rings, key=lambda ring: ring[:, 1].min())  # the only contour that reaches the region's top row
        holes = [ring for ring in rings if ring is not outline]
        regions.append(
            TumourRegion(
                outline=outline * tile_extent_level0,
                holes=tuple(hole * tile_extent_level0 for hole in holes),
                area_um2=float(area_um2),
                hole_areas_um2=tuple(_ring_area(hole) * tile_um**2 for hole in holes),
                mean_probability=float(heatmap[box][member].mean(dtype=np.float64)),
                tiles=tiles,
            )
        )
    regions.sort(key=lambda region: -region.area_um2)
    return regions


def _rings(member: np.ndarray) -> list[np.ndarray]:
    """The closed contours of one connected mask as rings of (x, y) tile-corner coordinates, corners only."""
    padded = np.pad(member, 1).astype(np.float32)
    upsampled = padded.repeat(2, axis=0).repeat(2, axis=1)
    # 'low': the background is 8-connected, so the region (4-connected) has no hole that touches the outside at a
    # corner: such a notch is part of the outline.
    contours = measure.find_contours(upsampled, 0.5, fully_connected="low")
    rings = []
    for contour in contours:
        # A vertex lies half-way between two pixel centres along one axis (a tile edge: (v + 0.5) / 2 whole) and on a
        # pixel centre along the other (a quarter tile from a corner): rounding gives the corner; less the padding.
        corners = np.rint((contour[:, ::-1] + 0.5) / 2.0) - 1.0
        rings.append(_corners_only(corners))
    return rings


def _ring_area(ring: np.ndarray) -> float:
    """The area a closed ring encloses, in its own units squared (the shoelace formula)."""
    x, y = ring[:, 0], ring[:, 1]
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0)


def _corners_only(points: np.ndarray) -> np.ndarray:
    """A closed ring with repeated points and points on straight runs removed, closed again."""
    kept = points[np.r_[True, np.any(np.diff(points, axis=0) != 0, axis=1)]]
    if len(kept) > 1 and np.array_equal(kept[0], kept[-1]):
        kept = kept[:-1]
    before, after = np.roll(kept, 1, axis=0), np.roll(kept, -1, axis=0)
    turns = (kept - before)[:, 0] * (after - kept)[:, 1] - (kept - before)[:, 1] * (after - kept)[:, 0] != 0
    kept = kept[turns]
    return np.vstack([kept, kept[:1]])
