"""The per-slide outputs of a WSI job, written to real files and read back by other means (zarr, PIL, json)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from serve_app.wsi.heatmaps import LEDGER_FOLDER, HeatmapStore
from serve_app.wsi.renderings import (
    NORMAL_CLASS,
    TUMOUR_CLASS,
    write_overlay_png,
    write_tiles_geojson,
    write_tissue_png,
)

ATTRIBUTES = {"slide": "a.svs", "level": 0, "tile_size": 224, "mpp": 0.5, "model": "he-tile-tumour", "version": "1"}
ROWS, COLS, CHUNK = 10, 13, 4  # a 3 x 4 chunk grid whose last row and column of chunks are partial


def a_heatmap(rows: int = ROWS, cols: int = COLS, seed: int = 0) -> np.ndarray:
    """Probabilities with a no-tissue border and one chunk (the top-left) entirely without tissue."""
    heatmap = np.random.default_rng(seed).random((rows, cols), dtype=np.float32)
    heatmap[:CHUNK, :CHUNK] = np.nan
    heatmap[-1, :] = np.nan
    return heatmap


def open_store(path: Path, **changes) -> HeatmapStore:
    config = {"rows": ROWS, "cols": COLS, "chunk_tiles": CHUNK, "attributes": ATTRIBUTES} | changes
    return HeatmapStore.open(path, **config)


def write_chunks(store: HeatmapStore, heatmap: np.ndarray, chunks) -> None:
    for chunk in chunks:
        store.write_chunk(*chunk, heatmap[store.tiles_of_chunk(*chunk)])


def all_chunks(store: HeatmapStore) -> list[tuple[int, int]]:
    down, across = store.chunk_grid
    return [(i, j) for i in range(down) for j in range(across)]


# -- the heatmap store ---------------------------------------------------------------------------------


def test_a_store_reads_back_what_was_written_and_zarr_reads_the_same(tmp_path):
    heatmap = a_heatmap()
    store = open_store(tmp_path / "heatmap.zarr")
    assert (store.rows, store.cols, store.chunk_tiles, store.chunk_grid) == (ROWS, COLS, CHUNK, (3, 4))
    write_chunks(store, heatmap, all_chunks(store))

    assert np.array_equal(store.read(), heatmap, equal_nan=True)
    assert store.is_complete() and store.unfinished_chunks() == []
    on_disk = zarr.open_array(store=tmp_path / "heatmap.zarr", mode="r")
    assert on_disk.metadata.zarr_format == 3
    assert on_disk.dtype == np.float32 and on_disk.chunks == (CHUNK, CHUNK)
    assert dict(on_disk.attrs) == ATTRIBUTES
    assert np.array_equal(on_disk[:], heatmap, equal_nan=True)


def test_edge_chunks_hold_fewer_tiles_and_refuse_a_full_size_block(tmp_path):
    store = open_store(tmp_path / "heatmap.zarr")
    assert store.tiles_of_chunk(2, 3) == (slice(8, 10), slice(12, 13))
    store.write_chunk(2, 3, np.full((2, 1), 0.25, np.float32))
    assert store.read()[8:10, 12:13].tolist() == [[0.25], [0.25]]
    with pytest.raises(ValueError, match="2 x 1 tiles"):
        store.write_chunk(2, 3, np.zeros((CHUNK, CHUNK), np.float32))
    with pytest.raises(IndexError):
        store.write_chunk(3, 0, np.zeros((CHUNK, CHUNK), np.float32))


def test_a_chunk_without_tissue_counts_as_finished_though_zarr_writes_no_file_for_it(tmp_path):
    store = open_store(tmp_path / "heatmap.zarr")
    store.write_chunk(0, 0, np.full((CHUNK, CHUNK), np.nan, np.float32))
    assert not (tmp_path / "heatmap.zarr" / "c" / "0" / "0").exists()  # what makes a file-based ledger wrong
    assert store.finished_chunks() == {(0, 0)}
    assert open_store(tmp_path / "heatmap.zarr").finished_chunks() == {(0, 0)}


def test_a_reopened_store_lists_the_chunks_finished_before(tmp_path):
    heatmap = a_heatmap()
    write_chunks(open_store(tmp_path / "heatmap.zarr"), heatmap, [(0, 1), (2, 3)])
    reopened = open_store(tmp_path / "heatmap.zarr")
    assert reopened.finished_chunks() == {(0, 1), (2, 3)}
    assert (0, 1) not in reopened.unfinished_chunks() and len(reopened.unfinished_chunks()) == 10


def test_a_job_killed_half_way_and_resumed_gives_the_uninterrupted_heatmap(tmp_path):
    heatmap = a_heatmap()
    uninterrupted = open_store(tmp_path / "once" / "heatmap.zarr")
    write_chunks(uninterrupted, heatmap, all_chunks(uninterrupted))

    first_run = open_store(tmp_path / "resumed" / "heatmap.zarr")
    write_chunks(first_run, heatmap, all_chunks(first_run)[::2])
    del first_run  # the job dies: nothing is closed or flushed on the way out
    second_run = open_store(tmp_path / "resumed" / "heatmap.zarr")
    to_do = second_run.unfinished_chunks()
    assert to_do == all_chunks(second_run)[1::2]
    write_chunks(second_run, heatmap, to_do)

    assert np.array_equal(second_run.read(), uninterrupted.read(), equal_nan=True)
    assert np.array_equal(second_run.read(), heatmap, equal_nan=True)


_WRITE_CHUNKS_UNTIL_KILLED = """
import sys
import numpy as np
from serve_app.wsi.heatmaps import HeatmapStore

path, rows, cols, chunk = sys.argv[1], *map(int, sys.argv[2:5])
heatmap = np.random.default_rng(1).random((rows, cols), dtype=np.float32)
store = HeatmapStore.open(path, rows=rows, cols=cols, chunk_tiles=chunk, attributes={"slide": "a.svs"})
down, across = store.chunk_grid
print("open", flush=True)
for i in range(down):
    for j in range(across):
        store.write_chunk(i, j, heatmap[store.tiles_of_chunk(i, j)])
"""


@pytest.mark.parametrize("killed_after_s", [0.3, 0.7, 1.5])
def test_a_writer_killed_at_any_moment_leaves_only_whole_chunks_listed(tmp_path, killed_after_s):
    """A real crash: the process writing the chunks is SIGKILLed part-way. Every chunk the ledger lists reads back
    exactly as written, and a store reopened after it lists at least one chunk and not all of them."""
    rows, cols, chunk = 400, 400, 4  # 10,000 chunks: far more than the writer finishes before it is killed
    path = tmp_path / "heatmap.zarr"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITE_CHUNKS_UNTIL_KILLED, str(path), str(rows), str(cols), str(chunk)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "open"
    time.sleep(killed_after_s)
    writer.kill()
    writer.wait(timeout=30)
    assert writer.returncode == -9, "the writer finished before it was killed: the test proves nothing"

    store = HeatmapStore.open(path, rows=rows, cols=cols, chunk_tiles=chunk, attributes={"slide": "a.svs"})
    finished = store.finished_chunks()
    assert 0 < len(finished) < store.chunk_grid[0] * store.chunk_grid[1]
    heatmap = np.random.default_rng(1).random((rows, cols), dtype=np.float32)
    read = store.read()
    for i, j in finished:
        assert np.array_equal(read[store.tiles_of_chunk(i, j)], heatmap[store.tiles_of_chunk(i, j)]), (i, j)


def test_simulated_crash_between_a_chunks_data_and_its_marker_leaves_it_unlisted(tmp_path, monkeypatch):
    """Simulated (a patched ``Path.touch`` and flush raise): the job dies between writing a chunk's data and
    recording it, the one moment a random kill above rarely hits. The ledger must not list it.

    The reverse (listed, data missing) cannot happen: the marker is created only after the data is written
    and flushed, which the failing flush below shows: no data on disk, no marker.
    """
    heatmap = a_heatmap()
    store = open_store(tmp_path / "heatmap.zarr")
    store.write_chunk(1, 1, heatmap[store.tiles_of_chunk(1, 1)])

    def die(*_):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Path, "touch", die)  # killed after the data, before the marker
    with pytest.raises(KeyboardInterrupt):
        store.write_chunk(1, 2, heatmap[store.tiles_of_chunk(1, 2)])
    monkeypatch.undo()
    monkeypatch.setattr(HeatmapStore, "_flush_chunk_file", die)  # killed before the data is on disk
    with pytest.raises(KeyboardInterrupt):
        store.write_chunk(2, 0, heatmap[store.tiles_of_chunk(2, 0)])
    monkeypatch.undo()

    resumed = open_store(tmp_path / "heatmap.zarr")
    assert resumed.finished_chunks() == {(1, 1)}
    assert sorted(p.name for p in (tmp_path / "heatmap.zarr" / LEDGER_FOLDER).iterdir()) == ["1.1"]
    read = resumed.read()
    assert np.isnan(read[store.tiles_of_chunk(1, 2)]).all()  # its data is on disk, but not vouched for
    assert np.array_equal(read[store.tiles_of_chunk(1, 1)], heatmap[store.tiles_of_chunk(1, 1)], equal_nan=True)


def test_rewriting_a_finished_chunk_changes_nothing(tmp_path):
    heatmap = a_heatmap()
    store = open_store(tmp_path / "heatmap.zarr")
    write_chunks(store, heatmap, all_chunks(store))
    write_chunks(store, heatmap, [(0, 0), (1, 2), (2, 3)])
    assert np.array_equal(store.read(), heatmap, equal_nan=True)
    assert store.finished_chunks() == set(all_chunks(store))


def test_threads_writing_different_chunks_at_once_lose_none(tmp_path):
    rows, cols = 64, 64
    heatmap = a_heatmap(rows, cols, seed=1)
    store = open_store(tmp_path / "heatmap.zarr", rows=rows, cols=cols)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda chunk: write_chunks(store, heatmap, [chunk]), all_chunks(store)))
    assert store.is_complete()
    assert np.array_equal(store.read(), heatmap, equal_nan=True)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"rows": ROWS + 1}, "shape"),
        ({"chunk_tiles": CHUNK * 2}, "chunks"),
        ({"attributes": ATTRIBUTES | {"version": "2"}}, "'version' = '1' on disk, '2' given"),
        ({"attributes": ATTRIBUTES | {"slide": "b.svs"}}, "'slide'"),
        ({"attributes": {k: v for k, v in ATTRIBUTES.items() if k != "mpp"}}, "'mpp' = 0.5 on disk, not given"),
    ],
)
def test_a_store_of_another_run_is_refused_naming_what_differs(tmp_path, changes, named):
    write_chunks(open_store(tmp_path / "heatmap.zarr"), a_heatmap(), [(0, 1)])
    with pytest.raises(ValueError, match="already holds another heatmap") as refused:
        open_store(tmp_path / "heatmap.zarr", **changes)
    assert named in str(refused.value)
    assert open_store(tmp_path / "heatmap.zarr").finished_chunks() == {(0, 1)}  # left as it was


def test_attributes_are_compared_as_stored_so_tuples_and_lists_are_the_same(tmp_path):
    open_store(tmp_path / "heatmap.zarr", attributes={"tile": (224, 224)})
    assert open_store(tmp_path / "heatmap.zarr", attributes={"tile": [224, 224]}).attributes == {"tile": [224, 224]}


def test_a_folder_that_is_not_a_heatmap_store_is_refused(tmp_path):
    (tmp_path / "heatmap.zarr").mkdir()
    (tmp_path / "heatmap.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a heatmap store"):
        open_store(tmp_path / "heatmap.zarr")
    # An empty folder (made by the job beforehand) is fine; creation leaves no staging folder behind.
    open_store(tmp_path / "empty" / "heatmap.zarr")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "heatmap.zarr").mkdir()
    open_store(tmp_path / "other" / "heatmap.zarr")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["heatmap.zarr"]


# -- PNGs -------------------------------------------------------------------------------------------------


def png_pixels_per_metre(path: Path) -> tuple[int, int, int]:
    """(x, y, unit) from the PNG's pHYs chunk, parsed from the bytes."""
    data = path.read_bytes()
    at = data.index(b"pHYs")
    return struct.unpack(">IIB", data[at + 4 : at + 13])


def test_the_tissue_png_is_grey_0_or_255_at_the_masks_size_and_mpp(tmp_path):
    mask = np.zeros((30, 50), bool)
    mask[5:20, 10:40] = True
    write_tissue_png(tmp_path / "tissue.png", mask, mpp=8.0)

    with Image.open(tmp_path / "tissue.png") as image:
        assert image.format == "PNG" and image.mode == "L" and image.size == (50, 30)
        pixels = np.asarray(image)
        assert image.info["mpp"] == "8"
    assert set(np.unique(pixels)) == {0, 255}
    assert np.array_equal(pixels == 255, mask)
    assert png_pixels_per_metre(tmp_path / "tissue.png") == (125_000, 125_000, 1)  # 1e6 / 8 µm
    assert [p.name for p in tmp_path.iterdir()] == ["tissue.png"]  # no staging file left


def overlay_case(tmp_path: Path, **options) -> tuple[np.ndarray, np.ndarray]:
    """A 40 x 60 thumbnail whose top-left 30 x 45 pixels are a 2 x 3 grid of 15-pixel tiles."""
    thumbnail = np.full((40, 60, 3), (230, 180, 200), np.uint8)
    heatmap = np.array([[0.0, 1.0, np.nan], [np.nan, 0.5, 1.0]], np.float32)
    write_overlay_png(tmp_path / "overlay.png", thumbnail, heatmap, extent=(30.0, 45.0), **options)
    with Image.open(tmp_path / "overlay.png") as image:
        assert image.mode == "RGB" and image.size == (60, 40)
        return thumbnail, np.asarray(image)


def test_the_overlay_colours_tiles_as_squares_and_leaves_the_rest_as_the_thumbnail(tmp_path):
    thumbnail, overlay = overlay_case(tmp_path)

    def tile(r, c):
        return overlay[r * 15 : (r + 1) * 15, c * 15 : (c + 1) * 15]

    for r, c in [(0, 0), (0, 1), (1, 1), (1, 2)]:
        assert (tile(r, c) == tile(r, c)[0, 0]).all()  # one colour per tile
        assert not np.array_equal(tile(r, c)[0, 0], thumbnail[0, 0])
    assert not np.array_equal(tile(0, 0)[0, 0], tile(0, 1)[0, 0])  # p = 0 and p = 1 differ
    assert tile(0, 0)[0, 0, 2] > tile(0, 0)[0, 0, 0] and tile(0, 1)[0, 0, 0] > tile(0, 1)[0, 0, 2]  # blue, red
    assert np.array_equal(tile(0, 1), tile(1, 2))
    # NaN tiles, and everything outside the heatmap's extent, are the thumbnail.
    assert np.array_equal(tile(0, 2), thumbnail[:15, 30:45]) and np.array_equal(tile(1, 0), thumbnail[15:30, :15])
    assert np.array_equal(overlay[30:], thumbnail[30:]) and np.array_equal(overlay[:, 45:], thumbnail[:, 45:])


def test_an_overlay_with_alpha_0_is_the_thumbnail_and_alpha_1_the_colour_map(tmp_path):
    thumbnail, overlay = overlay_case(tmp_path, alpha=0.0)
    assert np.array_equal(overlay, thumbnail)
    _, opaque = overlay_case(tmp_path, alpha=1.0, mpp=20.0)
    assert opaque[0, 0].tolist() == [0, 0, 255] and opaque[0, 20].tolist() == [255, 0, 0]
    assert png_pixels_per_metre(tmp_path / "overlay.png") == (50_000, 50_000, 1)


def test_an_extent_past_the_thumbnail_is_clipped(tmp_path):
    thumbnail = np.zeros((10, 10, 3), np.uint8)
    write_overlay_png(tmp_path / "o.png", thumbnail, np.ones((2, 2), np.float32), extent=(12.0, 12.0), alpha=1.0)
    with Image.open(tmp_path / "o.png") as image:
        assert (np.asarray(image) == (255, 0, 0)).all()


# -- GeoJSON ------------------------------------------------------------------------------------------------


def test_the_geojson_has_one_qupath_tile_per_classified_tile_in_level0_pixels(tmp_path):
    heatmap = np.full((3, 4), np.nan, np.float32)
    heatmap[0, 0] = 0.12345
    heatmap[2, 3] = 0.5  # exactly the threshold: Tumor
    heatmap[1, 2] = 0.49999
    count = write_tiles_geojson(tmp_path / "tiles.geojson", heatmap, tile_extent_level0=448.0)

    collection = json.loads((tmp_path / "tiles.geojson").read_text())
    assert count == 3 == len(collection["features"]) == np.isfinite(heatmap).sum()
    assert collection["type"] == "FeatureCollection"
    by_corner = {tuple(f["geometry"]["coordinates"][0][0]): f for f in collection["features"]}
    tile = by_corner[(3 * 448, 2 * 448)]  # row 2, column 3: x = 1344..1792, y = 896..1344
    assert tile["type"] == "Feature" and tile["geometry"]["type"] == "Polygon"
    assert tile["geometry"]["coordinates"] == [[[1344, 896], [1792, 896], [1792, 1344], [1344, 1344], [1344, 896]]]
    assert tile["properties"] == {
        "objectType": "tile",
        "classification": {"name": "Tumor", "color": [200, 0, 0]},
        "measurements": {"Tumour probability": 0.5},
    }
    assert by_corner[(0, 0)]["properties"]["measurements"] == {"Tumour probability": 0.1235}
    assert by_corner[(0, 0)]["properties"]["classification"] == NORMAL_CLASS
    assert by_corner[(2 * 448, 448)]["properties"]["classification"] == NORMAL_CLASS


def test_geojson_threshold_measurement_name_and_fractional_tile_extents(tmp_path):
    heatmap = np.array([[0.3, 0.8]], np.float32)
    write_tiles_geojson(
        tmp_path / "t.geojson", heatmap, tile_extent_level0=443.3, threshold=0.25, measurement="p(tumour)"
    )
    features = json.loads((tmp_path / "t.geojson").read_text())["features"]
    assert [f["properties"]["classification"] for f in features] == [TUMOUR_CLASS, TUMOUR_CLASS]
    assert features[1]["properties"]["measurements"] == {"p(tumour)": 0.8}
    assert features[1]["geometry"]["coordinates"][0][:3] == [[443.3, 0], [886.6, 0], [886.6, 443.3]]


def test_a_heatmap_without_tissue_gives_an_empty_feature_collection(tmp_path):
    assert write_tiles_geojson(tmp_path / "t.geojson", np.full((5, 5), np.nan, np.float32), tile_extent_level0=1) == 0
    assert json.loads((tmp_path / "t.geojson").read_text()) == {"type": "FeatureCollection", "features": []}
