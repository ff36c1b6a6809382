"""A slide's tumour regions (serve_app/wsi/regions.py) and its DICOM results (serve_app/wsi/annotations.py), without
a cluster: regions follow the tiles' edges with their holes, specks are dropped by area, and regions.geojson is what
QuPath imports; the probability map is a Parametric Map that dciodvfy finds no error in and highdicom reads back to
the heatmap's values exactly; the regions come back from the annotations with their measurements. The same objects
made by a live job on a DICOM WSI, stored to Orthanc and read back, are tested in test_wsi_readers.py."""

from __future__ import annotations

import json
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage
from skimage.measure import points_in_poly

from helpers import skip_unless_installed
from serve_app.config import AppConfig
from serve_app.model_repository import ModelRepository
from serve_app.wsi.annotations import described_slide, probability_map, reference_image, slide_annotations
from serve_app.wsi.regions import tumour_regions
from serve_app.wsi.renderings import write_regions_geojson

EXTENT, TILE_UM = 448.0, 112.0  # a 224 px tile at 0.5 mpp on a 0.25 mpp slide: 448 level-0 pixels, 112 µm
TILE_UM2 = TILE_UM**2


@pytest.fixture(scope="module")
def spec():
    return ModelRepository(AppConfig().model_repository).get("he-tile-tumour", None)


@pytest.fixture(scope="module")
def heatmap() -> np.ndarray:
    """A 5 x 5 block of tumour with a hole of one normal tile and one tile without tissue, a lone tumour tile (a
    speck), two tumour tiles touching the block at a corner only, and a row without tissue."""
    values = np.full((9, 12), 0.2, np.float32)
    values[1:6, 1:6] = 0.9
    values[2, 2] = 0.1  # normal: a hole
    values[4, 4] = np.nan  # no tissue: a hole too
    values[0, 10] = 0.95  # a speck
    values[6, 6:8] = 0.7  # touches the block's corner only: a region of its own
    values[8, :] = np.nan
    return values


def _inside(region, points: np.ndarray) -> np.ndarray:
    inside = points_in_poly(points, region.outline)
    for hole in region.holes:
        inside &= ~points_in_poly(points, hole)
    return inside


def test_regions_follow_the_tiles_edges_keep_holes_and_drop_specks(heatmap):
    regions = tumour_regions(heatmap, tile_extent_level0=EXTENT, tile_um=TILE_UM, threshold=0.5, min_area_um2=20_000)
    assert [region.tiles for region in regions] == [23, 2]  # largest first; the lone tile is a speck
    block, pair = regions
    assert block.outline.tolist() == (np.array([[6, 6], [1, 6], [1, 1], [6, 1], [6, 6]]) * EXTENT).tolist()
    squares = sorted(sorted(map(tuple, hole[:-1] / EXTENT)) for hole in block.holes)  # corners, in tiles
    assert squares == [[(2, 2), (2, 3), (3, 2), (3, 3)], [(4, 4), (4, 5), (5, 4), (5, 5)]]
    assert block.area_um2 == 23 * TILE_UM2 and block.hole_areas_um2 == (TILE_UM2, TILE_UM2)
    assert block.mean_probability == pytest.approx(0.9)
    assert pair.area_um2 == 2 * TILE_UM2 and pair.mean_probability == pytest.approx(0.7) and pair.holes == ()
    # Each tile's centre lies in a region (and outside its holes) exactly when the tile is tumour and no speck.
    rows, cols = np.indices(heatmap.shape)
    centres = np.column_stack([(cols.ravel() + 0.5) * EXTENT, (rows.ravel() + 0.5) * EXTENT])
    covered = np.zeros(len(centres), bool)
    for region in regions:
        covered |= _inside(region, centres)
    tumour = np.nan_to_num(heatmap) >= 0.5
    labels, _ = ndimage.label(tumour)
    sizes = np.bincount(labels.ravel())
    expected = tumour & (sizes[labels] * TILE_UM2 >= 20_000)
    assert np.array_equal(covered.reshape(heatmap.shape), expected)


def test_the_threshold_and_minimum_area_are_the_callers(heatmap):
    everything = tumour_regions(heatmap, tile_extent_level0=EXTENT, tile_um=TILE_UM, threshold=0.5, min_area_um2=0)
    assert sorted(region.tiles for region in everything) == [1, 2, 23]
    strict = tumour_regions(heatmap, tile_extent_level0=EXTENT, tile_um=TILE_UM, threshold=0.8, min_area_um2=0)
    assert sorted(region.tiles for region in strict) == [1, 23]
    assert tumour_regions(heatmap, tile_extent_level0=EXTENT, tile_um=TILE_UM, threshold=1.0, min_area_um2=0) == []


def test_regions_geojson_is_qupaths_annotation_format(heatmap, tmp_path):
    regions = tumour_regions(heatmap, tile_extent_level0=EXTENT, tile_um=TILE_UM, threshold=0.5, min_area_um2=20_000)
    assert write_regions_geojson(tmp_path / "regions.geojson", regions) == 2
    collection = json.loads((tmp_path / "regions.geojson").read_text(encoding="utf-8"))
    assert collection["type"] == "FeatureCollection"
    block = collection["features"][0]
    assert block["geometry"]["type"] == "Polygon" and len(block["geometry"]["coordinates"]) == 3  # outline, 2 holes
    assert all(ring[0] == ring[-1] for ring in block["geometry"]["coordinates"])
    assert block["geometry"]["coordinates"][0][1] == [448, 2688]  # whole pixels as integers
    properties = block["properties"]
    assert properties["objectType"] == "annotation" and properties["classification"]["name"] == "Tumor"
    assert properties["name"] == "Tumour region 1"
    assert properties["measurements"] == {"Area µm^2": 23 * TILE_UM2, "Mean tumour probability": 0.9}


def _dciodvfy_errors(path) -> list[str]:
    """dciodvfy's errors, less one it raises wrongly for a 2D ANN: dicom3tools of 2022 reports CommonZCoordinateValue
    as "only valid for 3D" in every group of a 2D object, which does not have it."""
    if shutil.which("dciodvfy") is None:
        skip_unless_installed("dciodvfy", "dciodvfy (Debian's dicom3tools) is not installed")
    checked = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (checked.stdout + checked.stderr).splitlines()
    return [line for line in lines if line.startswith("Error") and "CommonZCoordinateValue" not in line]


def test_a_non_dicom_slides_probability_map_is_on_a_new_frame_and_reads_back_exactly(heatmap, spec, tmp_path):
    """An SVS has no DICOM image: its map stands on a description of the slide, a new study and frame of
    reference; dciodvfy finds no error, and highdicom reads back the heatmap's float32 values, NaN included."""
    slide = described_slide(width=5000, height=4000, mpp=0.25)
    parametric_map = probability_map(heatmap, tile_extent_level0=EXTENT, source=slide, spec=spec)
    parametric_map.save_as(tmp_path / "probabilities.dcm", enforce_file_format=True)
    assert _dciodvfy_errors(tmp_path / "probabilities.dcm") == []
    back = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(tmp_path / "probabilities.dcm"))
    assert back.FrameOfReferenceUID == slide.FrameOfReferenceUID and back.StudyInstanceUID == slide.StudyInstanceUID
    assert np.array_equal(back.get_total_pixel_matrix().astype(np.float32), heatmap, equal_nan=True)
    spacing = back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == pytest.approx([EXTENT * 0.25e-3] * 2)  # a pixel per tile


def test_the_annotations_carry_tiles_regions_and_holes_with_their_measurements(heatmap, spec, tmp_path):
    source, own_frame = reference_image(described_slide(width=5000, height=4000, mpp=0.25))
    assert own_frame
    regions = tumour_regions(heatmap, tile_extent_level0=EXTENT, tile_um=TILE_UM, threshold=0.5, min_area_um2=20_000)
    annotations = slide_annotations(heatmap, regions, tile_extent_level0=EXTENT, source=source, spec=spec)
    annotations.save_as(tmp_path / "annotations.dcm", enforce_file_format=True)
    assert _dciodvfy_errors(tmp_path / "annotations.dcm") == []
    back = hd.ann.annread(tmp_path / "annotations.dcm")
    groups = {group.label: group for group in back.get_annotation_groups()}
    assert list(groups) == ["Tumour tiles", "Other tissue tiles", "Tumour regions", "Holes in tumour regions"]
    outlines = groups["Tumour regions"].get_graphic_data("2D")
    assert [outline.tolist() for outline in outlines] == [region.outline[:-1].tolist() for region in regions]
    names, values, units = groups["Tumour regions"].get_measurements()
    assert [name.meaning for name in names] == ["Probability of cancer", "Area"]
    assert [unit.value for unit in units] == ["1", "um2"]
    np.testing.assert_allclose(values, [[0.9, 23 * TILE_UM2], [0.7, 2 * TILE_UM2]], rtol=1e-6)
    assert len(groups["Holes in tumour regions"].get_graphic_data("2D")) == 2


def test_a_slide_without_a_frame_of_reference_gets_a_new_one_shared_by_its_results(heatmap, spec):
    slide = described_slide(width=5000, height=4000, mpp=0.25)
    del slide.FrameOfReferenceUID  # as OrthancWSIDicomizer leaves it out
    source, own_frame = reference_image(slide)
    assert not own_frame and "FrameOfReferenceUID" not in slide
    parametric_map = probability_map(heatmap, tile_extent_level0=EXTENT, source=source, spec=spec)
    assert parametric_map.FrameOfReferenceUID == source.FrameOfReferenceUID
