"""Tissue detection against the synthetic slides' ground truth, a blank slide, and tissue fractions per model tile."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from serve_app.samples.synthetic_slides import WrittenSlide, write_slide, write_slide_from_region
from serve_app.wsi.slides import SlideLevel, open_slide
from serve_app.wsi.tiling import TileGrid, plan_grid
from serve_app.wsi.tissue import TissueMask, detect_tissue


@pytest.fixture(scope="module", params=[21, 22])
def slide(request, tmp_path_factory) -> WrittenSlide:
    path = tmp_path_factory.mktemp("wsi") / f"slide-{request.param}.svs"
    return write_slide(path, 3000, 2200, mpp=0.5, tile=256, levels=3, seed=request.param, tissue_fraction=0.4)


@pytest.fixture(scope="module")
def glass_slide(tmp_path_factory) -> WrittenSlide:
    """Only glass: near-white with the grey noise of a scan (write_slide cannot make a slide without tissue)."""
    noise = np.random.default_rng(0).normal(0, 2.0, (64, 64, 1))
    glass = np.clip(242 + noise + np.array([0.0, 1.0, -1.0]), 0, 255).astype(np.uint8)  # a faint colour cast
    path = tmp_path_factory.mktemp("wsi") / "glass.svs"
    return write_slide_from_region(path, 3000, 2200, region=glass, mpp=0.5, tile=256, levels=3)


def _dice(found: np.ndarray, truth: np.ndarray) -> float:
    return 2 * float((found & truth).sum()) / float(found.sum() + truth.sum())


def _on_truth_grid(mask: TissueMask, truth_shape: tuple[int, int], truth_mpp: float) -> np.ndarray:
    """The mask sampled at the centres of the ground truth's cells: (rows, cols) bool."""
    rows = ((np.arange(truth_shape[0]) + 0.5) * truth_mpp / mask.mpp).astype(int).clip(0, mask.mask.shape[0] - 1)
    cols = ((np.arange(truth_shape[1]) + 0.5) * truth_mpp / mask.mpp).astype(int).clip(0, mask.mask.shape[1] - 1)
    return mask.mask[np.ix_(rows, cols)]


def test_tissue_mask_matches_the_ground_truth(slide):
    with open_slide(slide.path) as opened:
        tissue = detect_tissue(opened)
    assert tissue.mask.dtype == bool
    assert tissue.mpp == pytest.approx(8.0)  # level 2 (2 mpp) reduced by 4
    truth = slide.truth.tissue_mask
    assert _dice(_on_truth_grid(tissue, truth.shape, slide.truth.mpp), truth) > 0.9
    assert tissue.tissue_fraction == pytest.approx(truth.mean(), abs=0.05)


def test_tissue_mask_is_made_on_a_coarse_level_not_level_0(slide):
    with open_slide(slide.path) as opened:
        tissue = detect_tissue(opened, target_mpp=2.0)
    assert tissue.mpp == pytest.approx(2.0)
    assert tissue.mask.shape == (550, 750)  # level 2 as it is


def test_blank_slide_has_no_tissue(glass_slide):
    with open_slide(glass_slide.path) as opened:
        tissue = detect_tissue(opened)
    assert tissue.mask.shape == (138, 188)
    assert not tissue.mask.any()


def test_specks_smaller_than_the_minimum_object_are_dropped(slide):
    with open_slide(slide.path) as opened:
        everything = detect_tissue(opened, min_object_um2=0)
        large_only = detect_tissue(opened, min_object_um2=1e6)  # a millimetre square
    assert large_only.mask.sum() <= everything.mask.sum()
    labels, count = ndimage.label(large_only.mask)
    sizes_um2 = np.bincount(labels.ravel())[1:] * large_only.mpp**2
    assert count == 0 or sizes_um2.min() >= 1e6


def test_tile_fractions_cover_the_grid_with_tissue_where_the_mask_has_it(slide):
    with open_slide(slide.path) as opened:
        tissue = detect_tissue(opened)
        grid = plan_grid(opened, tile_size=224, mpp=0.5)
    fractions = tissue.tile_fractions(grid)
    assert fractions.shape == (grid.rows, grid.cols) and fractions.dtype == np.float32
    assert fractions.min() >= 0 and fractions.max() <= 1
    assert fractions.max() == pytest.approx(1.0)  # some tile wholly in tissue
    # Tissue area is conserved: the grid (padded past the slide's edge) holds the mask's tissue.
    tile_um2 = (grid.tile_extent * grid.level.mpp) ** 2
    assert fractions.sum() * tile_um2 == pytest.approx(tissue.mask.sum() * tissue.mpp**2, rel=1e-3)


def test_tile_fraction_is_exact_for_a_known_mask():
    """A 112 µm tile over 8 µm mask pixels: 14 x 14 pixels per tile."""
    mask = np.zeros((28, 28), bool)
    mask[:14, :7] = True  # half of tile (0, 0)
    mask[14:, 14:] = True  # all of tile (1, 1)
    tissue = TissueMask(mask=mask, mpp=8.0)
    level = SlideLevel(index=0, width=448, height=448, downsample=1.0, mpp=0.5, tile_width=256, tile_height=256)
    grid = TileGrid(level=level, tile_size=224, mpp=0.5, scale=1.0, rows=2, cols=2)
    assert np.allclose(tissue.tile_fractions(grid), [[0.5, 0.0], [0.0, 1.0]])
