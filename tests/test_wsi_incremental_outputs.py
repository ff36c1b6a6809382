"""A WSI job's outputs built up unit by unit, as its work units come back, are those of the whole heatmap at once, as
they were written before (the reference implementations below are the former ones): the GeoJSON to the byte, the
overlay pixel for pixel; and the tissue mask's saturation, channel by channel, is the former one value for value."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from serve_app.wsi import renderings
from serve_app.wsi.renderings import OverlayPainter, TileFeatures, write_overlay_png, write_tiles_geojson
from serve_app.wsi.tissue import _saturation


def former_geojson(heatmap: np.ndarray, tile_extent_level0: float) -> bytes:
    """The GeoJSON as it was written: ``json.dumps`` of one feature dict per classified tile."""
    features = []
    for r, c in np.argwhere(np.isfinite(heatmap)):
        probability = float(heatmap[r, c])
        x0, x1 = renderings._coordinate(c * tile_extent_level0), renderings._coordinate((c + 1) * tile_extent_level0)
        y0, y1 = renderings._coordinate(r * tile_extent_level0), renderings._coordinate((r + 1) * tile_extent_level0)
        feature = {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "tile",
                "classification": renderings.TUMOUR_CLASS if probability >= 0.5 else renderings.NORMAL_CLASS,
                "measurements": {"Tumour probability": round(probability, 4)},
            },
        }
        features.append(json.dumps(feature))
    return ('{"type": "FeatureCollection", "features": [\n' + ",\n".join(features) + "\n]}\n").encode()


def former_overlay(thumbnail: np.ndarray, heatmap: np.ndarray, extent: tuple[float, float], alpha: float) -> np.ndarray:
    """The overlay as it was painted: the whole heatmap at once, blended in float64."""
    height, width = thumbnail.shape[:2]
    overlay = thumbnail.copy()
    tile_rows = renderings._tiles_under_pixels(height, extent[0], heatmap.shape[0])
    tile_cols = renderings._tiles_under_pixels(width, extent[1], heatmap.shape[1])
    probabilities = heatmap[np.ix_(tile_rows, tile_cols)]
    painted = np.isfinite(probabilities)
    indices = np.round(np.clip(np.nan_to_num(probabilities), 0.0, 1.0) * 255).astype(np.intp)
    region = overlay[: len(tile_rows), : len(tile_cols)]
    blended = (1.0 - alpha) * region + alpha * renderings._LUT[indices]
    region[painted] = np.round(blended[painted]).astype(np.uint8)
    return overlay


def a_heatmap(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    heatmap = rng.random(shape, dtype=np.float32)
    heatmap[rng.random(shape) < 0.3] = np.nan
    heatmap[0, :3] = [0.0, 1.0, 0.5]  # the ends of the colour map and the class threshold
    return heatmap


def units_in_random_order(shape: tuple[int, int], unit: int, seed: int) -> list[tuple[slice, slice]]:
    blocks = [
        (slice(r, min(r + unit, shape[0])), slice(c, min(c + unit, shape[1])))
        for r in range(0, shape[0], unit)
        for c in range(0, shape[1], unit)
    ]
    order = np.random.default_rng(seed).permutation(len(blocks))
    return [blocks[i] for i in order]


@pytest.mark.parametrize("tile_extent_level0", [896.0, 224 * 1.37, 333.3333])
def test_the_geojson_made_unit_by_unit_is_the_former_whole_heatmap_one_to_the_byte(tmp_path, tile_extent_level0):
    heatmap = a_heatmap((37, 45), seed=1)
    features = TileFeatures(heatmap.shape, tile_extent_level0=tile_extent_level0)
    for rows, cols in units_in_random_order(heatmap.shape, 8, seed=2):
        features.add(rows, cols, heatmap[rows, cols])
    assert features.write(tmp_path / "units.geojson") == int(np.isfinite(heatmap).sum())
    expected = former_geojson(heatmap, tile_extent_level0)
    assert (tmp_path / "units.geojson").read_bytes() == expected
    write_tiles_geojson(tmp_path / "whole.geojson", heatmap, tile_extent_level0=tile_extent_level0)
    assert (tmp_path / "whole.geojson").read_bytes() == expected


@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.0, 1.0])
@pytest.mark.parametrize("extent", [(600.0, 560.0), (640.5, 400.2), (300.0, 700.0)])
def test_the_overlay_painted_unit_by_unit_is_the_former_whole_heatmap_one_pixel_for_pixel(tmp_path, alpha, extent):
    heatmap = a_heatmap((37, 45), seed=3)
    thumbnail = np.random.default_rng(4).integers(0, 256, (600, 560, 3), dtype=np.uint8)
    painter = OverlayPainter(thumbnail, heatmap.shape, extent=extent, alpha=alpha)
    blocks = units_in_random_order(heatmap.shape, 8, seed=5)
    for rows, cols in blocks + blocks[:3]:  # painting a unit again changes nothing
        painter.paint(rows, cols, heatmap[rows, cols])
    expected = former_overlay(thumbnail, heatmap, extent, alpha)
    np.testing.assert_array_equal(painter.image, expected)
    write_overlay_png(tmp_path / "overlay.png", thumbnail, heatmap, extent=extent, alpha=alpha)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "overlay.png")), expected)


def test_saturation_channel_by_channel_is_the_former_value_for_value():
    rgb = np.random.default_rng(6).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    rgb[:10] = 0  # black: no saturation, no division by zero
    high, low = rgb.max(axis=2).astype(np.float32), rgb.min(axis=2).astype(np.float32)
    former = ndimage.uniform_filter(
        np.divide(high - low, high, out=np.zeros_like(high), where=high > 0), size=3, mode="nearest"
    )
    np.testing.assert_array_equal(_saturation(rgb), former)
