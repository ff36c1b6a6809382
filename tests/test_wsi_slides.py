"""Opening whole-slide images: levels and mpp, both readers' pixels, and every unusable file refused with a reason."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tifffile

from serve_app.errors import InvalidSlide
from serve_app.samples.synthetic_slides import WrittenSlide, write_slide
from serve_app.wsi.slides import SlideLevel, open_slide

WIDTH, HEIGHT, MPP, TILE, LEVELS = 3000, 2200, 0.5, 256, 3
READERS = ("tifffile", "cucim")


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> WrittenSlide:
    path = tmp_path_factory.mktemp("wsi") / "slide.svs"
    return write_slide(path, WIDTH, HEIGHT, mpp=MPP, tile=TILE, levels=LEVELS, seed=5)


@pytest.fixture(scope="module")
def levels_read_whole(slide) -> list[np.ndarray]:
    """Every level as tifffile reads it whole: (H, W, 3) uint8 RGB, level 0 first."""
    return [tifffile.imread(slide.path, series=0, level=k) for k in range(LEVELS)]


def _write_tiled(path, image: np.ndarray, **kwargs) -> None:
    """One tiled page of ``image``, no thumbnail: the smallest file for each kind of refusal."""
    tifffile.imwrite(path, image, tile=(256, 256), metadata=None, **kwargs)


@pytest.mark.parametrize("reader", READERS)
def test_levels_are_the_pyramid_with_their_mpp_and_tile_grid(slide, reader):
    with open_slide(slide.path, reader=reader) as opened:
        assert opened.reader == reader
        assert opened.levels == tuple(
            SlideLevel(
                index=k,
                width=-(-WIDTH // 2**k),
                height=-(-HEIGHT // 2**k),
                downsample=pytest.approx(2.0**k, rel=1e-3),
                mpp=pytest.approx(MPP * 2**k, rel=1e-3),
                tile_width=TILE,
                tile_height=TILE,
            )
            for k in range(LEVELS)
        )


def test_auto_reader_opens_with_one_of_the_readers(slide):
    with open_slide(slide.path) as opened:
        assert opened.reader in READERS
        assert opened.path == slide.path


def test_mpp_given_overrides_the_file_and_scales_with_each_level(slide):
    with open_slide(slide.path, mpp=0.25) as opened:
        assert [level.mpp for level in opened.levels] == pytest.approx([0.25, 0.5, 1.0])


def test_mpp_comes_from_resolution_tags_in_inches(tmp_path):
    path = tmp_path / "inch.tif"
    _write_tiled(path, np.full((512, 512, 3), 200, np.uint8), resolution=(25_400 / 0.25,) * 2, resolutionunit="INCH")
    with open_slide(path) as opened:
        assert opened.levels[0].mpp == pytest.approx(0.25)


def test_slide_without_resolution_metadata_is_refused_until_its_mpp_is_given(tmp_path):
    path = tmp_path / "no-resolution.tif"
    _write_tiled(path, np.full((512, 512, 3), 200, np.uint8))  # tifffile's default: 1 pixel per unit NONE
    with pytest.raises(InvalidSlide, match=r"no resolution metadata.*--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as opened:
        assert opened.levels[0].mpp == 0.5


@pytest.mark.parametrize(
    ("level", "box"),
    [
        (0, (0, 0, 3000, 2200)),  # the whole level
        (0, (300, 200, 517, 333)),  # unaligned, within tiles
        (1, (250, 100, 700, 900)),  # another level, past its bottom edge
        (2, (700, 500, 50, 50)),  # the coarsest level's bottom-right corner
    ],
)
def test_cucim_and_tifffile_readers_give_the_same_tiles(slide, levels_read_whole, level, box):
    """Both decode with libjpeg-turbo: identical pixels, not merely close, on the slides we write."""
    x, y, width, height = box
    regions = []
    for reader in READERS:
        with open_slide(slide.path, reader=reader) as opened:
            regions.append(opened.read_region(level, x, y, width, height))
    assert regions[0].shape == regions[1].shape == (height, width, 3)
    assert regions[0].dtype == regions[1].dtype == np.uint8
    assert np.array_equal(regions[0], regions[1])
    inside = levels_read_whole[level][y : y + height, x : x + width]
    assert np.array_equal(regions[0][: inside.shape[0], : inside.shape[1]], inside)


@pytest.mark.parametrize("reader", READERS)
def test_region_outside_the_level_is_white(slide, levels_read_whole, reader):
    with open_slide(slide.path, reader=reader) as opened:
        region = opened.read_region(0, -40, -30, 100, 80)
        assert (region[:30] == 255).all() and (region[:, :40] == 255).all()
        assert np.array_equal(region[30:, 40:], levels_read_whole[0][:50, :60])
        beyond = opened.read_region(1, 5000, 5000, 64, 64)
        assert beyond.shape == (64, 64, 3) and (beyond == 255).all()


def test_thumbnail_is_the_whole_slide_within_max_side(slide):
    with open_slide(slide.path) as opened:
        thumbnail = opened.thumbnail(max_side=512)
    assert thumbnail.shape == (round(512 * HEIGHT / WIDTH), 512, 3)
    assert thumbnail.dtype == np.uint8


def test_random_bytes_are_refused_as_not_a_tiff(tmp_path):
    path = tmp_path / "random.svs"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(InvalidSlide, match="not a TIFF"):
        open_slide(path)


@pytest.mark.parametrize("reader", ["auto", *READERS])
def test_first_half_of_a_slide_is_refused_as_truncated(slide, tmp_path, reader):
    path = tmp_path / "half.svs"
    data = slide.path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidSlide, match="truncated"):
        open_slide(path, reader=reader)


def test_slide_cut_inside_its_last_level_is_refused_at_open(slide, tmp_path):
    """A few kilobytes missing: the pages are all there, tiles of the last level are not."""
    path = tmp_path / "short.svs"
    data = slide.path.read_bytes()
    with tifffile.TiffFile(slide.path) as tif:
        last = tif.series[0].levels[-1].keyframe
        end_of_tiles = max(o + c for o, c in zip(last.dataoffsets, last.databytecounts, strict=True))
        ifds_after_tiles = all(page.offset < end_of_tiles - 1000 for page in tif.pages)
    # Were an IFD written after the last tiles, cutting them would cut the page chain instead: the slide fixture
    # must keep writing its pages first for this test to mean what it says.
    assert ifds_after_tiles, "the test slide has an IFD after its last tiles: write it with its pages first"
    path.write_bytes(data[: end_of_tiles - 1000])
    with pytest.raises(InvalidSlide, match="truncated"):
        open_slide(path)


def test_corrupt_tile_raises_invalid_slide_when_read(slide, tmp_path):
    """The library's decoder error becomes InvalidSlide, not a 500 and not a white tile taken for glass."""
    path = tmp_path / "corrupt-tile.svs"
    shutil.copy(slide.path, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[5], page.databytecounts[5]
    with open(path, "r+b") as file:
        os.pwrite(file.fileno(), b"\0" * count, offset)
    with open_slide(path, reader="tifffile") as opened:
        opened.read_region(0, 0, 0, 256, 256)  # tile 0 is intact
        with pytest.raises(InvalidSlide, match="corrupt"):
            opened.read_region(0, 0, 0, 6 * TILE, TILE)


def test_stripped_image_is_refused_as_not_a_tiled_pyramid(tmp_path):
    path = tmp_path / "stripped.tif"
    tifffile.imwrite(path, np.full((300, 5000, 3), 230, np.uint8), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with pytest.raises(InvalidSlide, match=r"not a tiled pyramid.*vips tiffsave"):
        open_slide(path)


def test_single_large_tiled_level_is_read_and_the_notes_say_its_low_resolution_image_is_made_from_it(tmp_path):
    path = tmp_path / "one-level.tif"
    _write_tiled(path, np.full((256, 4352, 3), 230, np.uint8), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert len(slide.levels) == 1 and len(slide.reader_notes) == 1
        assert "one resolution level (4352x256 px)" in slide.reader_notes[0] and "--pyramid" in slide.reader_notes[0]


def test_greyscale_slide_is_refused_as_not_rgb(tmp_path):
    path = tmp_path / "grey.tif"
    _write_tiled(path, np.full((512, 512), 200, np.uint8), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with pytest.raises(InvalidSlide, match=r"not RGB.*greyscale"):
        open_slide(path)


def test_sixteen_bit_slide_is_refused_as_not_8_bit(tmp_path):
    path = tmp_path / "sixteen-bit.tif"
    _write_tiled(path, np.full((512, 512, 3), 200, np.uint16), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with pytest.raises(InvalidSlide, match="16-bit samples"):
        open_slide(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InvalidSlide, match="does not exist"):
        open_slide(tmp_path / "absent.svs")


def test_an_empty_file_is_refused_as_empty_not_as_another_format(tmp_path):
    path = tmp_path / "copy-failed.svs"
    path.touch()
    with pytest.raises(InvalidSlide, match="empty") as refused:
        open_slide(path)
    assert "vips" not in refused.value.reason


def test_refusals_never_name_the_file(tmp_path):
    path = tmp_path / "PATIENT-Jane-Doe-1970.svs"
    path.write_bytes(b"II*\x00" + b"\xff" * 100)  # a TIFF header pointing nowhere
    with pytest.raises(InvalidSlide) as refused:
        open_slide(path)
    assert "Jane" not in refused.value.reason and "PATIENT" not in refused.value.reason
