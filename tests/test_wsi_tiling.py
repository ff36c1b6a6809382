"""The model-tile grid: which level serves the model's mpp, and blocks of tiles equal to cutting a whole level."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from serve_app.errors import InvalidSlide
from serve_app.samples.synthetic_slides import WrittenSlide, write_slide
from serve_app.wsi.slides import open_slide
from serve_app.wsi.tiling import plan_grid, read_tile_block

TILE_SIZE, MODEL_MPP = 224, 0.5


@pytest.fixture(scope="module")
def half_micron_slide(tmp_path_factory) -> WrittenSlide:
    path = tmp_path_factory.mktemp("wsi") / "half-micron.svs"
    return write_slide(path, 3000, 2200, mpp=0.5, tile=256, levels=3, seed=7)


@pytest.fixture(scope="module")
def quarter_micron_slide(tmp_path_factory) -> WrittenSlide:
    path = tmp_path_factory.mktemp("wsi") / "quarter-micron.svs"
    return write_slide(path, 2400, 1800, mpp=0.25, tile=256, levels=2, seed=8)


@pytest.fixture(scope="module")
def quarter_micron_single_level_slide(tmp_path_factory) -> WrittenSlide:
    path = tmp_path_factory.mktemp("wsi") / "quarter-micron-one-level.svs"
    return write_slide(path, 1200, 1000, mpp=0.25, tile=256, levels=1, seed=9)


def _tiles_cut_from(level: np.ndarray, extent: int, rows: int, cols: int) -> np.ndarray:
    """(rows, cols, extent, extent, 3): the level padded white to the grid and cut into tiles."""
    padded = np.full((rows * extent, cols * extent, 3), 255, np.uint8)
    inside = level[: rows * extent, : cols * extent]
    padded[: inside.shape[0], : inside.shape[1]] = inside
    return padded.reshape(rows, extent, cols, extent, 3).swapaxes(1, 2)


def test_slide_at_the_models_mpp_is_tiled_on_level_0_unscaled(half_micron_slide):
    with open_slide(half_micron_slide.path) as slide:
        grid = plan_grid(slide, tile_size=TILE_SIZE, mpp=MODEL_MPP)
    assert (grid.level.index, grid.scale, grid.tile_extent) == (0, 1.0, 224)
    assert (grid.rows, grid.cols) == (-(-2200 // 224), -(-3000 // 224))  # last row and column padded
    assert grid.tile_box(1, 2) == (448, 224, 224, 224)
    assert grid.tile_extent_level0 == 224.0


def test_slide_at_twice_the_models_resolution_is_tiled_on_its_level_1(quarter_micron_slide):
    with open_slide(quarter_micron_slide.path) as slide:
        grid = plan_grid(slide, tile_size=TILE_SIZE, mpp=MODEL_MPP)
    assert (grid.level.index, grid.scale, grid.tile_extent) == (1, 1.0, 224)
    assert grid.tile_extent_level0 == pytest.approx(448.0)


def test_slide_without_a_level_at_the_models_mpp_is_read_finer_and_downsampled(quarter_micron_single_level_slide):
    with open_slide(quarter_micron_single_level_slide.path) as slide:
        grid = plan_grid(slide, tile_size=TILE_SIZE, mpp=MODEL_MPP)
        assert (grid.level.index, grid.scale, grid.tile_extent) == (0, 2.0, 448)
        assert (grid.rows, grid.cols) == (3, 3)
        block = read_tile_block(slide, grid, range(0, 2), range(0, 2))
    level0 = tifffile.imread(quarter_micron_single_level_slide.path, series=0, level=0)
    # Antialiased bilinear at a factor of 2 is a 4-tap triangle filter: close to the 2 x 2 box average,
    # nowhere near the aliasing of taking every other pixel.
    box_average = level0[:896, :896].reshape(448, 2, 448, 2, 3).mean(axis=(1, 3))
    expected = _tiles_cut_from(box_average, 224, 2, 2)
    assert block.shape == (2, 2, 224, 224, 3) and block.dtype == np.uint8
    difference = np.abs(block.astype(np.float32) - expected)
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 8


def test_mpp_between_levels_picks_the_coarsest_finer_level(half_micron_slide):
    with open_slide(half_micron_slide.path, mpp=0.3) as slide:  # levels at 0.3, 0.6, 1.2 mpp
        grid = plan_grid(slide, tile_size=TILE_SIZE, mpp=MODEL_MPP)
    assert grid.level.index == 0
    assert grid.scale == pytest.approx(0.5 / 0.3)
    assert grid.tile_extent == round(224 * 0.5 / 0.3)


def test_level_within_tolerance_of_the_models_mpp_is_read_unscaled(half_micron_slide):
    with open_slide(half_micron_slide.path, mpp=0.26) as slide:  # level 1 at 0.52 mpp
        grid = plan_grid(slide, tile_size=TILE_SIZE, mpp=MODEL_MPP)
    assert (grid.level.index, grid.scale) == (1, 1.0)


def test_slide_coarser_than_the_model_is_refused_naming_both_mpps(half_micron_slide):
    with open_slide(half_micron_slide.path, mpp=2.0) as slide, pytest.raises(InvalidSlide, match=r"\b2\b.*0\.5"):
        plan_grid(slide, tile_size=TILE_SIZE, mpp=MODEL_MPP)


@pytest.mark.parametrize("reader", ["tifffile", "cucim"])
def test_tile_blocks_equal_tiles_cut_from_the_whole_level(half_micron_slide, reader):
    level0 = tifffile.imread(half_micron_slide.path, series=0, level=0)
    with open_slide(half_micron_slide.path, reader=reader) as slide:
        grid = plan_grid(slide, tile_size=TILE_SIZE, mpp=MODEL_MPP)
        expected = _tiles_cut_from(level0, 224, grid.rows, grid.cols)
        whole = read_tile_block(slide, grid, range(grid.rows), range(grid.cols))
        assert np.array_equal(whole, expected)
        for rows, cols in [
            (range(3, 5), range(4, 7)),
            (range(grid.rows - 1, grid.rows), range(grid.cols - 2, grid.cols)),
        ]:
            block = read_tile_block(slide, grid, rows, cols)
            assert block.shape == (len(rows), len(cols), 224, 224, 3)
            assert np.array_equal(block, expected[rows.start : rows.stop, cols.start : cols.stop])


def test_tile_block_on_level_1_equals_tiles_cut_from_level_1(quarter_micron_slide):
    level1 = tifffile.imread(quarter_micron_slide.path, series=0, level=1)
    with open_slide(quarter_micron_slide.path) as slide:
        grid = plan_grid(slide, tile_size=TILE_SIZE, mpp=MODEL_MPP)
        block = read_tile_block(slide, grid, range(1, 3), range(2, 5))
    assert np.array_equal(block, _tiles_cut_from(level1, 224, grid.rows, grid.cols)[1:3, 2:5])


def test_downsampled_blocks_match_torch_antialiased_resize_of_the_level(quarter_micron_single_level_slide):
    """A block resized as one image: inner tiles equal resizing the whole level (no seams at tile edges)."""
    with open_slide(quarter_micron_single_level_slide.path, mpp=0.3) as slide:
        grid = plan_grid(slide, tile_size=TILE_SIZE, mpp=MODEL_MPP)
        block = read_tile_block(slide, grid, range(grid.rows), range(grid.cols))
    extent = grid.tile_extent
    level0 = tifffile.imread(quarter_micron_single_level_slide.path, series=0, level=0)
    padded = np.full((grid.rows * extent, grid.cols * extent, 3), 255, np.uint8)
    padded[: level0.shape[0], : level0.shape[1]] = level0[: padded.shape[0], : padded.shape[1]]
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(padded).permute(2, 0, 1)[None],
        size=(grid.rows * 224, grid.cols * 224),
        mode="bilinear",
        antialias=True,
    )[0].permute(1, 2, 0)
    assert np.array_equal(block, resized.numpy().reshape(grid.rows, 224, grid.cols, 224, 3).swapaxes(1, 2))


def test_blocks_outside_the_grid_are_refused(half_micron_slide):
    with open_slide(half_micron_slide.path) as slide:
        grid = plan_grid(slide, tile_size=TILE_SIZE, mpp=MODEL_MPP)
        with pytest.raises(IndexError):
            read_tile_block(slide, grid, range(grid.rows, grid.rows + 1), range(1))
        with pytest.raises(IndexError):
            grid.tile_box(0, grid.cols)
