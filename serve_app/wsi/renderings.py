"""What a pathologist opens the next morning: the heatmap over the slide, the tissue mask, the tiles in QuPath.

Three files per slide, each written under a temporary name and renamed into place, so a job killed while
writing never leaves a truncated file that looks finished:

- ``tissue.png``: the tissue mask, 8-bit grey (255 tissue, 0 background). Its pHYs chunk gives the mask's
  resolution (pixels per metre, ``1e6 / mpp``), so image viewers and scripts know its scale.
- ``overlay.png``: the slide's thumbnail with each classified tile painted in a blue (0) → red (1) colour
  map, blended with the thumbnail; tiles without tissue leave the thumbnail as it is.
- ``tiles.geojson``: a GeoJSON FeatureCollection as QuPath (0.4+) exports and imports it: one square tile
  object per classified tile in level-0 pixel coordinates, classified "Tumor" or "Normal", with the
  probability as a measurement. QuPath: *File → Import objects from file* (or drag the file onto the
  viewer); then *Measure → Show measurement maps* colours tiles by probability.
- ``regions.geojson``: the tumour regions (``serve_app/wsi/regions.py``) as QuPath annotation objects, one polygon
  with its holes per region, classified "Tumor", its area and mean probability as measurements.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from serve_app.wsi.regions import TumourRegion

__all__ = [
    "NORMAL_CLASS",
    "TUMOUR_CLASS",
    "OverlayPainter",
    "TileFeatures",
    "colour_map",
    "tissue_png",
    "write_in_place",
    "write_overlay_png",
    "write_regions_geojson",
    "write_tiles_geojson",
    "write_tissue_png",
]

# QuPath's built-in "Tumor" class and its colour, so imported tiles match QuPath's own. It has no
# built-in class for normal tissue ("Stroma" is a tissue type, "Negative" a stain result): "Normal" is
# created on import with the colour given here.
TUMOUR_CLASS = {"name": "Tumor", "color": [200, 0, 0]}
NORMAL_CLASS = {"name": "Normal", "color": [90, 90, 180]}

# Colour map anchors (probability, RGB): blue → cyan → yellow → red, "jet"-like, readable on pink H&E.
_COLOUR_ANCHORS = np.array(
    [
        (0.00, 0, 0, 255),
        (0.35, 0, 255, 255),
        (0.65, 255, 255, 0),
        (1.00, 255, 0, 0),
    ],
    dtype=np.float64,
)


def colour_map() -> np.ndarray:
    """(256, 3) uint8: the overlay's colour for probability ``i / 255`` at row ``i``."""
    levels = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(levels, _COLOUR_ANCHORS[:, 0], _COLOUR_ANCHORS[:, k]) for k in (1, 2, 3)]
    return np.round(np.stack(channels, axis=1)).astype(np.uint8)


_LUT = colour_map()


def write_tissue_png(path: Path, mask: np.ndarray, *, mpp: float) -> None:
    """Write a tissue mask as an 8-bit grey PNG: 255 where ``mask`` (``(H, W)`` bool) is set, 0 elsewhere.

    ``mpp`` is the mask's microns per pixel; it is written as the PNG's pHYs (pixels per metre).
    """
    write_in_place(path, tissue_png(mask, mpp=mpp))


def tissue_png(mask: np.ndarray, *, mpp: float) -> bytes:
    """The PNG file :func:`write_tissue_png` writes, as bytes: a job encodes it while its units run."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a tissue mask is (H, W), not {mask.shape}")
    image = Image.fromarray(np.where(mask.astype(bool), 255, 0).astype(np.uint8), mode="L")
    return _png_bytes(image, mpp=mpp)


def write_overlay_png(
    path: Path,
    thumbnail: np.ndarray,
    heatmap: np.ndarray,
    *,
    extent: tuple[float, float],
    alpha: float = 0.5,
    mpp: float | None = None,
) -> None:
    """Paint a heatmap over a slide's thumbnail and write it as an RGB PNG of the thumbnail's size.

    ``thumbnail`` is ``(H, W, 3)`` uint8 RGB of the whole slide. ``heatmap`` is ``(rows, cols)`` float32,
    one probability per tile, NaN for tiles without tissue; its tiles cover the slide's top-left
    ``rows * tile`` × ``cols * tile`` region, which is ``extent = (height, width)`` thumbnail pixels
    (``rows * tile_extent_level0 * H / slide_height_level0``, and likewise across; it may run past the
    thumbnail's edge, which clips it). Each thumbnail pixel takes the tile under its centre (nearest
    neighbour, so tiles show as squares) blended as ``(1 - alpha) * thumbnail + alpha * colour``; pixels
    of NaN tiles and pixels outside the extent keep the thumbnail's colour. Tiles smaller than a
    thumbnail pixel are sampled, not averaged: pass a larger thumbnail to see every tile.
    ``mpp``, if given, is the thumbnail's microns per pixel, written as the PNG's pHYs.
    """
    painter = OverlayPainter(thumbnail, np.shape(heatmap), extent=extent, alpha=alpha)
    painter.paint(slice(0, painter.rows), slice(0, painter.cols), heatmap)
    painter.save(path, mpp=mpp)


class OverlayPainter:
    """The overlay of :func:`write_overlay_png`, painted a block of tiles at a time as a job's work units finish,
    so that only the PNG's encoding is left once the last one is in.

    Each tile's pixels are blended from the thumbnail (never from what was painted before): painting a block
    again with the same probabilities changes nothing, and the overlay of every block painted equals the
    overlay of the whole heatmap at once, pixel for pixel. Blocks that do not overlap may be painted from
    several threads at once.
    """

    def __init__(
        self, thumbnail: np.ndarray, shape: tuple[int, int], *, extent: tuple[float, float], alpha: float = 0.5
    ):
        thumbnail = np.asarray(thumbnail)
        if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
            raise ValueError(f"a thumbnail is (H, W, 3) uint8, not {thumbnail.shape} {thumbnail.dtype}")
        if len(shape) != 2:
            raise ValueError(f"a heatmap is (rows, cols), not {tuple(shape)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha is between 0 and 1, not {alpha}")
        self.thumbnail = thumbnail
        self.image = thumbnail.copy()
        self.rows, self.cols = (int(n) for n in shape)
        height, width = thumbnail.shape[:2]
        extent_height, extent_width = extent
        if self.rows and self.cols and extent_height > 0 and extent_width > 0:
            # The tile under each pixel's centre, for the pixels the heatmap covers (ascending along each axis).
            self._tile_rows = _tiles_under_pixels(height, extent_height, self.rows)
            self._tile_cols = _tiles_under_pixels(width, extent_width, self.cols)
        else:
            self._tile_rows = self._tile_cols = np.zeros(0, np.intp)
        # round((1 - alpha) * pixel + alpha * colour) for every pixel value (row) and colour value (column), in
        # float64 as the whole-image formula: looked up rather than computed per pixel.
        values = np.arange(256, dtype=np.float64)
        self._blend = np.round((1.0 - alpha) * values[:, None] + alpha * values[None, :]).astype(np.uint8)

    def paint(self, rows: slice, cols: slice, probabilities: np.ndarray) -> None:
        """Paint tiles ``rows`` x ``cols`` of the heatmap (slices of step 1) with ``probabilities`` (NaN: left as
        the thumbnail)."""
        probabilities = np.asarray(probabilities, dtype=np.float32)
        y0, y1 = np.searchsorted(self._tile_rows, (rows.start, rows.stop))
        x0, x1 = np.searchsorted(self._tile_cols, (cols.start, cols.stop))
        if y0 == y1 or x0 == x1:
            return
        # The block's colour index per tile, then per pixel.
        painted_tiles = np.isfinite(probabilities)
        indices = np.round(np.clip(np.nan_to_num(probabilities), 0.0, 1.0) * 255).astype(np.intp)
        pixel_rows = self._tile_rows[y0:y1] - rows.start
        pixel_cols = self._tile_cols[x0:x1] - cols.start
        painted = painted_tiles[np.ix_(pixel_rows, pixel_cols)]
        colours = _LUT[indices[np.ix_(pixel_rows, pixel_cols)][painted]]  # (n, 3)
        under = self.thumbnail[y0:y1, x0:x1][painted]  # (n, 3)
        self.image[y0:y1, x0:x1][painted] = self._blend[under, colours]

    def save(self, path: Path, *, mpp: float | None = None) -> None:
        """Write the overlay as an RGB PNG, with the fastest zlib level: a slide's thumbnail compresses little
        better at the default level, at about twice the time."""
        _save_png(path, Image.fromarray(self.image, mode="RGB"), mpp=mpp, compress_level=1)


def write_tiles_geojson(
    path: Path,
    heatmap: np.ndarray,
    *,
    tile_extent_level0: float,
    threshold: float = 0.5,
    measurement: str = "Tumour probability",
) -> int:
    """Write every classified tile of a heatmap as a QuPath tile object; return how many were written.

    ``heatmap`` is ``(rows, cols)`` float32, NaN for tiles without tissue (they are left out). Tile
    ``(r, c)`` is the square ``x in [c*e, (c+1)*e]``, ``y in [r*e, (r+1)*e]`` in level-0 pixels, with
    ``e = tile_extent_level0``, written as a closed 5-point Polygon ring of ``[x, y]`` points. Its
    properties: ``objectType`` "tile", ``classification`` :data:`TUMOUR_CLASS` if its probability is at
    least ``threshold``, else :data:`NORMAL_CLASS`, and ``measurements`` ``{measurement: p}`` with p
    rounded to 4 places.
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap is (rows, cols), not {heatmap.shape}")
    features = TileFeatures(
        heatmap.shape, tile_extent_level0=tile_extent_level0, threshold=threshold, measurement=measurement
    )
    features.add(slice(0, heatmap.shape[0]), slice(0, heatmap.shape[1]), heatmap)
    return features.write(path)


class TileFeatures:
    """The features of :func:`write_tiles_geojson`, made a block of tiles at a time as a job's work units finish
    and written in the tiles' row-major order at the end: the same bytes as the whole heatmap at once.

    A feature's text is put together from pieces made once (each column's x, each row's y, the two classes)
    rather than by ``json.dumps`` of a dict per tile, with the same result (``json`` writes a float as its
    ``repr``), at a tenth of the time. Blocks that do not overlap may be added from several threads at once.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        tile_extent_level0: float,
        threshold: float = 0.5,
        measurement: str = "Tumour probability",
    ):
        if not tile_extent_level0 > 0:
            raise ValueError(f"tile_extent_level0 is positive, not {tile_extent_level0}")
        rows, cols = shape
        self.threshold = threshold
        self._texts = np.full((rows, cols), None, dtype=object)  # about 300 bytes a classified tile
        self._added = np.zeros((rows, cols), dtype=bool)
        edges = [json.dumps(_coordinate(i * tile_extent_level0)) for i in range(max(rows, cols) + 1)]
        self._edges = edges
        self._classes = {
            True: json.dumps(TUMOUR_CLASS),
            False: json.dumps(NORMAL_CLASS),
        }
        self._measurement = json.dumps(measurement)

    def add(self, rows: slice, cols: slice, probabilities: np.ndarray) -> None:
        """The features of tiles ``rows`` x ``cols`` (slices of step 1): one per finite probability."""
        probabilities = np.asarray(probabilities, dtype=np.float32)
        edges, classes, measurement, threshold = self._edges, self._classes, self._measurement, self.threshold
        block = self._texts[rows, cols]
        finite = np.isfinite(probabilities)
        for r, c in np.argwhere(finite):
            probability = float(probabilities[r, c])
            row, col = rows.start + int(r), cols.start + int(c)
            x0, x1, y0, y1 = edges[col], edges[col + 1], edges[row], edges[row + 1]
            block[r, c] = (
                '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
                f"[[[{x0}, {y0}], [{x1}, {y0}], [{x1}, {y1}], [{x0}, {y1}], [{x0}, {y0}]]]}}, "
                '"properties": {"objectType": "tile", '
                f'"classification": {classes[probability >= threshold]}, '
                f'"measurements": {{{measurement}: {round(probability, 4)!r}}}}}}}'
            )
        self._added[rows, cols] = finite

    def write(self, path: Path) -> int:
        """Write the FeatureCollection of the features added, in the tiles' row-major order; how many there are."""
        texts = self._texts[self._added]  # row-major
        with _written_in_place(path) as staging, open(staging, "w", encoding="utf-8") as out:
            out.write('{"type": "FeatureCollection", "features": [\n')
            out.write(",\n".join(texts))
            out.write("\n]}\n")
        return len(texts)


def write_regions_geojson(path: Path, regions: list[TumourRegion]) -> int:
    """Write tumour regions as QuPath annotation objects; return how many were written.

    Each is a Polygon feature (its outline, then its holes, rings of ``[x, y]`` level-0 pixels), ``objectType``
    "annotation", named "Tumour region N" (largest first), classified :data:`TUMOUR_CLASS`, with the measurements
    ``Area µm^2`` (QuPath's own name for it) and ``Mean tumour probability`` (rounded to 4 places).
    """
    features = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [[_coordinate(x), _coordinate(y)] for x, y in ring] for ring in (region.outline, *region.holes)
                ],
            },
            "properties": {
                "objectType": "annotation",
                "name": f"Tumour region {number}",
                "classification": TUMOUR_CLASS,
                "measurements": {
                    "Area µm^2": round(region.area_um2, 1),
                    "Mean tumour probability": round(region.mean_probability, 4),
                },
            },
        }
        for number, region in enumerate(regions, start=1)
    ]
    collection = {"type": "FeatureCollection", "features": features}
    write_in_place(Path(path), json.dumps(collection, ensure_ascii=False).encode("utf-8"))
    return len(features)


def _tiles_under_pixels(pixels: int, extent: float, tiles: int) -> np.ndarray:
    """For pixels 0, 1, ... along one axis, the tile under each pixel's centre, up to the extent's end
    or the thumbnail's edge, whichever comes first."""
    covered = min(pixels, math.ceil(extent))
    tile_of_pixel = np.floor((np.arange(covered) + 0.5) * tiles / extent).astype(np.intp)
    return tile_of_pixel[tile_of_pixel < tiles]


def _coordinate(value: float) -> int | float:
    # Whole pixels as integers, others to a thousandth of a pixel: no 895.9999999999 in the file.
    value = round(float(value), 3)
    return int(value) if value.is_integer() else value


def _save_png(path: Path, image: Image.Image, *, mpp: float | None, compress_level: int | None = None) -> None:
    data = _png_bytes(image, mpp=mpp, compress_level=compress_level)
    with _written_in_place(path) as staging:
        staging.write_bytes(data)


def _png_bytes(image: Image.Image, *, mpp: float | None, compress_level: int | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    options = {} if compress_level is None else {"compress_level": compress_level}
    if mpp is not None:
        if not mpp > 0:
            raise ValueError(f"mpp is positive, not {mpp}")
        # PNG's pHYs is pixels per metre (1e6 / mpp); PIL writes it from dots per inch, rounding
        # dpi / 0.0254 to the nearest whole pixel per metre.
        dpi = 0.0254 * 1e6 / mpp
        options["dpi"] = (dpi, dpi)
        info.add_text("mpp", f"{mpp:g}")  # the exact value: pHYs holds a whole number of pixels per metre
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, **options)
    return buffer.getvalue()


def write_in_place(path: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name beside ``path`` and rename it into place."""
    with _written_in_place(path) as staging:
        staging.write_bytes(data)


@contextlib.contextmanager
def _written_in_place(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once written, it replaces ``path`` in one step."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
