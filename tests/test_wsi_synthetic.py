"""Synthetic whole-slide images: real pyramidal TIFFs, read back with tifffile as a scanner's would be."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from serve_app.samples.synthetic_slides import (
    THUMBNAIL_MAX_SIDE,
    WrittenSlide,
    he_region,
    write_slide,
    write_slide_from_region,
)
from serve_app.samples.synthetic_tissue import GroundTruth, make_slide_canvas

WIDTH, HEIGHT, MPP, TILE, LEVELS = 3000, 2200, 0.5, 256, 3


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> WrittenSlide:
    path = tmp_path_factory.mktemp("wsi") / "slide.tiff"
    return write_slide(path, WIDTH, HEIGHT, mpp=MPP, tile=TILE, levels=LEVELS, seed=11)


@pytest.fixture(scope="module")
def level0(slide) -> np.ndarray:
    return tifffile.imread(slide.path, series=0, level=0)


def _mpp_of(page: tifffile.TiffPage) -> tuple[float, float]:
    """Microns per pixel (x, y) from the page's resolution tags, which must be in pixels per centimetre."""
    assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
    (xn, xd), (yn, yd) = page.tags["XResolution"].value, page.tags["YResolution"].value
    return 1e4 * xd / xn, 1e4 * yd / yn


def test_reads_as_a_pyramid_of_halving_levels(slide):
    expected = [(-(-HEIGHT // 2**k), -(-WIDTH // 2**k)) for k in range(LEVELS)]
    assert list(slide.level_shapes) == expected
    with tifffile.TiffFile(slide.path) as tif:
        baseline = tif.series[0]
        assert (baseline.name, baseline.kind) == ("Baseline", "svs")
        assert [level.shape for level in baseline.levels] == [(h, w, 3) for h, w in expected]
        for k, level in enumerate(baseline.levels):
            page = level.keyframe
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (TILE, TILE)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.dtype == np.uint8
            assert _mpp_of(page) == pytest.approx((MPP * 2**k, MPP * 2**k))


def test_aperio_layout_that_cucim_needs(slide):
    """cuCIM walks only the main IFD chain and, in an Aperio file, takes the one stripped page for the
    thumbnail: every other page must be a tiled level, and no level may hide in SubIFDs."""
    with tifffile.TiffFile(slide.path) as tif:
        pages = list(tif.pages)
        assert len(pages) == LEVELS + 1
        assert pages[0].is_svs
        assert tifffile.tifffile.svs_description_metadata(pages[0].description)["MPP"] == MPP
        assert [p.is_tiled for p in pages] == [True, False] + [True] * (LEVELS - 1)
        assert all(p.subfiletype == 0 and not p.subifds for p in pages)


def test_tiles_decode_one_by_one(slide, level0):
    with tifffile.TiffFile(slide.path) as tif:
        page = tif.pages[0]
        tiles_across = -(-WIDTH // TILE)
        for index in (0, tiles_across + 3, len(page.dataoffsets) - 1):  # first, inner, bottom-right corner
            tif.filehandle.seek(page.dataoffsets[index])
            data = tif.filehandle.read(page.databytecounts[index])
            tile, (_, _, row, col, _), _ = page.decode(data, index, jpegtables=page.jpegtables)
            y, x = row, col  # pixel offsets of the tile
            inside = level0[y : y + TILE, x : x + TILE]
            assert np.array_equal(tile[0, : inside.shape[0], : inside.shape[1]], inside)


def test_every_level_shows_the_same_tissue(slide, level0):
    """Each level is rendered afresh at its own mpp; it must match level 0 averaged down."""
    grey0 = level0.mean(axis=2)
    for k in range(1, LEVELS):
        level = tifffile.imread(slide.path, series=0, level=k).mean(axis=2)
        f = 2**k
        h, w = HEIGHT // f, WIDTH // f
        averaged = grey0[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3))
        # Compared at 16 um, the scale of the tissue's layout; finer, JPEG and nuclei placement differ.
        s = 32 // f
        a = averaged[: h // s * s, : w // s * s].reshape(h // s, s, w // s, s).mean(axis=(1, 3))
        b = level[: h // s * s, : w // s * s].reshape(h // s, s, w // s, s).mean(axis=(1, 3))
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_thumbnail(slide, level0):
    with tifffile.TiffFile(slide.path) as tif:
        thumbnail = tif.series[1]
        assert thumbnail.name == "Thumbnail"
        image = thumbnail.asarray()
    assert image.shape == (*slide.thumbnail_shape, 3)
    assert max(image.shape[:2]) == THUMBNAIL_MAX_SIDE
    assert image.shape[1] / image.shape[0] == pytest.approx(WIDTH / HEIGHT, abs=0.01)
    # The same slide: tissue where level 0 has tissue.
    small = np.asarray(Image.fromarray(level0).resize(image.shape[1::-1], Image.BOX), dtype=float)
    assert np.corrcoef(small.mean(axis=2).ravel(), image.mean(axis=2).ravel())[0, 1] > 0.9


def test_ground_truth_file(slide):
    truth = slide.truth
    assert truth is not None and truth.mpp == 16.0
    assert truth.labels.shape == (-(-HEIGHT * MPP // 16), -(-WIDTH * MPP // 16))
    assert set(np.unique(truth.labels)) == {GroundTruth.GLASS, GroundTruth.NORMAL, GroundTruth.TUMOUR}
    png = Image.open(slide.truth_path)
    assert np.array_equal(np.asarray(png), truth.labels)
    assert 25_400 / png.info["dpi"][0] == pytest.approx(truth.mpp, rel=1e-3)


def _per_truth_cell(mask: np.ndarray, cells: tuple[int, int], cell_px: int) -> np.ndarray:
    """Fraction of each truth cell's pixels in ``mask``: (rows, cols)."""
    rows, cols = cells
    padded = np.zeros((rows * cell_px, cols * cell_px), bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.reshape(rows, cell_px, cols, cell_px).mean(axis=(1, 3))


def test_ground_truth_lines_up_with_the_image(slide, level0):
    """Tumour cells are crowded with dark nuclei, normal tissue is not, glass is empty: cell by cell."""
    truth = slide.truth
    cell_px = round(truth.mpp / MPP)
    # Dark and bluish: haematoxylin-stained nuclei; pink stroma and pale glass are neither.
    rgb = level0.astype(np.int16)
    nuclear = _per_truth_cell((rgb.mean(axis=2) < 150) & (rgb[..., 2] >= rgb[..., 0]), truth.labels.shape, cell_px)
    glass = _per_truth_cell(rgb.min(axis=2) > 215, truth.labels.shape, cell_px)
    # Cells a cell away from any other class, so that soft and ragged edges do not count.
    core = {c: ndimage.binary_erosion(truth.labels == c, iterations=1) for c in (0, 1, 2)}
    assert all(c.sum() >= 20 for c in core.values())
    tumour, normal = nuclear[core[GroundTruth.TUMOUR]].mean(), nuclear[core[GroundTruth.NORMAL]].mean()
    assert tumour > 0.25 and tumour > 4 * normal
    assert nuclear[core[GroundTruth.GLASS]].max() < 0.01  # at most the tip of a nucleus at the tissue's edge
    assert (glass[core[GroundTruth.GLASS]] > 0.95).mean() > 0.99
    assert glass[core[GroundTruth.NORMAL]].mean() < 0.2 and glass[core[GroundTruth.TUMOUR]].mean() < 0.05


def test_canvas_renders_the_same_in_any_tiling():
    canvas = make_slide_canvas(1024, 1024, seed=4)
    whole = canvas.render(100, 200, 300, 400, 0.5)
    assert whole.shape == (300, 400, 3) and whole.dtype == np.uint8
    pieces = [canvas.render(100, 200, 300, 150, 0.5), canvas.render(100, 350, 300, 250, 0.5)]
    assert np.array_equal(np.concatenate(pieces, axis=1), whole)
    assert np.array_equal(make_slide_canvas(1024, 1024, seed=4).render(100, 200, 300, 400, 0.5), whole)
    assert not np.array_equal(make_slide_canvas(1024, 1024, seed=5).render(100, 200, 300, 400, 0.5), whole)


def test_slide_from_a_real_he_region(tmp_path):
    region = he_region()
    assert region.shape == (240, 240, 3) and region.dtype == np.uint8
    slide = write_slide_from_region(tmp_path / "real.tiff", 1000, 700, mpp=0.5, tile=256, levels=2)
    assert slide.truth is None and slide.level_shapes == ((700, 1000), (350, 500))
    with tifffile.TiffFile(slide.path) as tif:
        assert [level.shape for level in tif.series[0].levels] == [(700, 1000, 3), (350, 500, 3)]
        assert tif.series[1].name == "Thumbnail"
        level0 = tif.series[0].levels[0].asarray()
        level1 = tif.series[0].levels[1].asarray()
    # The region at the origin, mirrored to its right and below; JPEG (4:2:0) changes this detailed image's
    # pixels by ~6 on average, where a wrong placement differs by ~75.
    assert np.abs(level0[:240, :240].astype(int) - region).mean() < 10
    assert np.abs(level0[:240, 240:480].astype(int) - region[:, ::-1]).mean() < 10
    assert np.abs(level0[240:480, :240].astype(int) - region[::-1]).mean() < 10
    averaged = level0[:480, :480].reshape(240, 2, 240, 2, 3).mean(axis=(1, 3))
    assert np.abs(level1[:240, :240] - averaged).mean() < 10
