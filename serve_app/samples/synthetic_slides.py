"""Whole-slide images written as a scanner writes them: pyramidal, tiled, JPEG-compressed TIFF.

The layout is Aperio SVS's, the one that both tifffile and cuCIM read as a pyramid with a thumbnail:

=======  ===========================================================================
page 0   level 0, full resolution: tiled; ImageDescription starts "Aperio " (MPP, AppMag)
page 1   thumbnail: stripped (not tiled), NewSubfileType 0
page 2+  levels 1, 2, ...: tiled, each half the previous level's size (rounded up)
then     with ``label_and_macro``: the label (LZW, stripped, NewSubfileType 1, description "label WxH") and the
         macro photograph of the whole glass slide (JPEG, stripped, NewSubfileType 9, "macro WxH"), as Aperio
         writes them and OpenSlide reads them (its associated images ``label`` and ``macro``)
=======  ===========================================================================

Every level carries XResolution / YResolution in pixels per centimetre (ResolutionUnit CENTIMETER), so
its mpp (microns per pixel) is ``1e4 / XResolution``. JPEG tiles are YCbCr with 4:2:0 subsampling, as
scanners write them (tifffile converts RGB for JPEG by itself). The other layouts fail one reader:

- levels as SubIFDs of page 0 (OME-TIFF style): cuCIM walks only the main IFD chain and sees one level;
- levels as plain pages with a thumbnail page (generic tiled TIFF): both readers take the thumbnail for
  one more pyramid level. Without a thumbnail that layout works in both, but has nowhere to put one.

Slides are written tile by tile from a generator, one strip of tiles rendered at a time, so memory
stays at a few strips whatever the slide's size; each pyramid level is rendered afresh at its own mpp
rather than downsampled from the level below, which would need that whole level in memory.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image

from serve_app.samples.synthetic_tissue import GroundTruth, make_slide_canvas

__all__ = [
    "LABEL_SHAPE",
    "MACRO_SHAPE",
    "THUMBNAIL_MAX_SIDE",
    "Compression",
    "MirroredRegion",
    "WrittenSlide",
    "default_levels",
    "he_region",
    "write_slide",
    "write_slide_from_region",
]

THUMBNAIL_MAX_SIDE = 1024  # pixels, the thumbnail's longer side
LABEL_SHAPE = (400, 380)  # (height, width) pixels of the label page: a 25 mm label at about 15 pixels a millimetre
MACRO_SHAPE = (380, 1140)  # (height, width) pixels of the macro page: the 25 x 75 mm glass slide
_RENDER_WIDTH_PX = 512  # tiles are rendered this many pixels of a row at a time: cache-sized, measured fastest
# Tiles tifffile collects before compressing them in parallel: its default (256 MiB) would be most of the
# memory used.
_ENCODE_BUFFER_BYTES = 32 * 2**20

Compression = Literal["jpeg", "deflate", "lzw", "none"]
_TIFFFILE_COMPRESSION = {"jpeg": "jpeg", "deflate": "adobe_deflate", "lzw": "lzw", "none": None}

# (top, left, height, width, mpp) -> (height, width, 3) uint8 RGB: a region of the slide's pixel grid at mpp.
RenderRegion = Callable[[int, int, int, int, float], np.ndarray]


@dataclass(frozen=True)
class WrittenSlide:
    """A slide on disk, and what went into it."""

    path: Path
    mpp: float  # microns per pixel of level 0
    tile: int  # tile side in pixels, every level
    level_shapes: tuple[tuple[int, int], ...]  # (height, width) in pixels, level 0 first
    thumbnail_shape: tuple[int, int]  # (height, width)
    truth: GroundTruth | None  # labels (0 glass, 1 normal, 2 tumour) on a coarse grid; None for real tissue
    truth_path: Path | None  # the same labels as a PNG, values 0/1/2, its pHYs giving the grid's mpp


def default_levels(width: int, height: int, tile: int) -> int:
    """Pyramid levels, halving until the smallest level's longer side is within four tiles."""
    return 1 + max(0, math.floor(math.log2(max(width, height) / (4 * tile))))


def write_slide(
    path: Path,
    width: int,
    height: int,
    *,
    mpp: float = 0.5,
    tile: int = 256,
    levels: int | None = None,
    seed: int = 0,
    compression: Compression = "jpeg",
    quality: int = 85,
    tissue_fraction: float = 0.5,
    tumour_fraction: float = 0.35,
    label_and_macro: bool = False,
) -> WrittenSlide:
    """A synthetic H&E slide of ``width`` x ``height`` pixels at ``mpp``, and its ground truth.

    Tissue pieces cover ``tissue_fraction`` of the slide and tumour ``tumour_fraction`` of the tissue
    (``serve_app.samples.synthetic_tissue``), all from ``seed``. The ground truth is also written beside the
    slide, as ``<stem>.truth.png``. ``label_and_macro`` adds Aperio's label and macro pages after the pyramid.
    """
    canvas = make_slide_canvas(
        width, height, mpp=mpp, seed=seed, tissue_fraction=tissue_fraction, tumour_fraction=tumour_fraction
    )
    path = Path(path)
    slide = _write_pyramid(
        path,
        canvas.render,
        width,
        height,
        mpp=mpp,
        tile=tile,
        levels=levels,
        compression=compression,
        quality=quality,
        label_and_macro=label_and_macro,
    )
    truth = canvas.ground_truth()
    truth_path = path.with_name(f"{path.stem}.truth.png")
    # PNG's pHYs holds pixels per metre: 1e6 / mpp; Pillow takes it as dots per inch.
    Image.fromarray(truth.labels).save(truth_path, dpi=(25_400 / truth.mpp,) * 2)
    return replace(slide, truth=truth, truth_path=truth_path)


def he_region() -> np.ndarray:
    """A real H&E-stained region, as the ``wsidicom-data`` package ships it: (240, 240, 3) uint8 RGB."""
    # Found without importing the package, whose __init__ pulls in all of wsidicom.
    spec = importlib.util.find_spec("wsidicom_data")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the wsidicom-data package (test extras) ships the H&E region")
    png = Path(spec.submodule_search_locations[0]) / "data" / "test_tile.png"
    return np.asarray(Image.open(png).convert("RGB"))


def write_slide_from_region(
    path: Path,
    width: int,
    height: int,
    *,
    region: np.ndarray | None = None,
    mpp: float = 0.5,
    tile: int = 256,
    levels: int | None = None,
    compression: Compression = "jpeg",
    quality: int = 85,
    label_and_macro: bool = False,
) -> WrittenSlide:
    """A slide of real tissue: ``region`` ((H, W, 3) uint8 RGB; default ``he_region()``) mirrored over
    ``width`` x ``height`` pixels, declared to be at ``mpp``. It has no ground truth. ``label_and_macro`` adds
    Aperio's label and macro pages after the pyramid."""
    source = MirroredRegion(he_region() if region is None else region, mpp=mpp)
    return _write_pyramid(
        Path(path),
        source.render,
        width,
        height,
        mpp=mpp,
        tile=tile,
        levels=levels,
        compression=compression,
        quality=quality,
        label_and_macro=label_and_macro,
    )


class MirroredRegion:
    """An image repeated over the plane, every other copy mirrored so that no seam shows.

    ``region`` is (H, W, 3) uint8 RGB at ``mpp``, cropped to multiples of 16 pixels so that coarser
    levels, box averages over 2**k pixels, stay periodic with a small period up to level 5 and beyond.
    """

    def __init__(self, region: np.ndarray, mpp: float):
        if region.ndim != 3 or region.shape[2] != 3 or min(region.shape[:2]) < 16:
            raise ValueError(f"region must be (H, W, 3) RGB of at least 16 x 16 pixels, got {region.shape}")
        height, width = (region.shape[0] // 16) * 16, (region.shape[1] // 16) * 16
        region = np.ascontiguousarray(region[:height, :width], dtype=np.uint8)
        top = np.concatenate([region, region[:, ::-1]], axis=1)
        self.period = np.concatenate([top, top[::-1]], axis=0)  # (2H, 2W, 3): the repeating unit
        self.mpp = mpp
        self.level = lru_cache(maxsize=16)(self._level)

    def _level(self, factor: int) -> np.ndarray:
        """The plane box-averaged over ``factor`` x ``factor`` pixels, one period of it: (h, w, 3) uint8."""
        repeats = [factor // math.gcd(side, factor) for side in self.period.shape[:2]]
        unit = np.tile(self.period, (*repeats, 1)).astype(np.float32)
        h, w = unit.shape[0] // factor, unit.shape[1] // factor
        return np.rint(unit.reshape(h, factor, w, factor, 3).mean(axis=(1, 3))).astype(np.uint8)

    def render(self, top: int, left: int, height: int, width: int, mpp: float) -> np.ndarray:
        """Region of the plane at ``mpp`` (the region's own or coarser): (height, width, 3) uint8 RGB.

        At powers of two the pixels are exact box averages; between them (a thumbnail) the nearest
        pixel of the next finer level.
        """
        scale = mpp / self.mpp
        factor = 2 ** max(0, math.floor(math.log2(scale) + 1e-9))
        level = self.level(factor)
        step = scale / factor
        rows = np.floor((top + np.arange(height)) * step).astype(np.intp) % level.shape[0]
        cols = np.floor((left + np.arange(width)) * step).astype(np.intp) % level.shape[1]
        return level.take(rows, axis=0).take(cols, axis=1)


def _write_pyramid(
    path: Path,
    render: RenderRegion,
    width: int,
    height: int,
    *,
    mpp: float,
    tile: int,
    levels: int | None,
    compression: Compression,
    quality: int,
    label_and_macro: bool = False,
) -> WrittenSlide:
    """Write ``render``'s slide as an Aperio-layout pyramid (see the module's docstring)."""
    if tile % 16 or tile < 16:
        raise ValueError(f"tile must be a positive multiple of 16 (TIFF requires it), got {tile}")
    if compression not in _TIFFFILE_COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(_TIFFFILE_COMPRESSION)}, got {compression!r}")
    levels = levels or default_levels(width, height, tile)
    shapes = tuple((math.ceil(height / 2**k), math.ceil(width / 2**k)) for k in range(levels))
    thumb_scale = max(1.0, max(width, height) / THUMBNAIL_MAX_SIDE)
    thumb_shape = (max(1, round(height / thumb_scale)), max(1, round(width / thumb_scale)))

    header = f"Aperio Image Library medserve synthetic\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    codec = f"{compression.upper()}/RGB" + (f" Q={quality}" if compression == "jpeg" else "")
    compressionargs = {"level": quality} if compression == "jpeg" else None
    # Uncompressed size, an upper bound: classic TIFF's 32-bit offsets end at 4 GiB.
    bigtiff = 3 * sum(h * w for h, w in shapes) > 2**32 - 2**26
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for level, (level_h, level_w) in enumerate(shapes):
            level_mpp = mpp * 2**level
            if level == 0:
                description = f"{header} {codec}|AppMag = {10 / mpp:g}|MPP = {mpp:g}|Title = synthetic H&E"
            else:
                description = f"{header} -> {level_w}x{level_h} {codec}"
            tif.write(
                _level_tiles(render, level_h, level_w, tile, level_mpp),
                shape=(level_h, level_w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=_TIFFFILE_COMPRESSION[compression],
                compressionargs=compressionargs,
                resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                resolutionunit="CENTIMETER",
                description=description,
                software="medserve",
                metadata=None,  # no tifffile JSON: it would take precedence over the Aperio layout
                maxworkers=2,
                buffersize=_ENCODE_BUFFER_BYTES,
            )
            if level == 0:
                _write_thumbnail(tif, render, thumb_shape, mpp * width / thumb_shape[1], header, compression, quality)
        if label_and_macro:
            _write_label_and_macro(tif, render, width, height, mpp, header)
    return WrittenSlide(
        path=path, mpp=mpp, tile=tile, level_shapes=shapes, thumbnail_shape=thumb_shape, truth=None, truth_path=None
    )


def _write_thumbnail(
    tif: tifffile.TiffWriter,
    render: RenderRegion,
    shape: tuple[int, int],
    thumb_mpp: float,
    header: str,
    compression: Compression,
    quality: int,
) -> None:
    """The thumbnail page: stripped, not tiled, which is what marks it as no pyramid level."""
    # cuCIM decodes associated images compressed with JPEG or LZW only.
    jpeg = compression == "jpeg"
    tif.write(
        render(0, 0, *shape, thumb_mpp),
        photometric="rgb",
        compression="jpeg" if jpeg else "lzw",
        compressionargs={"level": quality} if jpeg else None,
        rowsperstrip=16,
        resolution=(1e4 / thumb_mpp, 1e4 / thumb_mpp),
        resolutionunit="CENTIMETER",
        description=f"{header} -> {shape[1]}x{shape[0]} - thumbnail",
        metadata=None,
    )


def _write_label_and_macro(
    tif: tifffile.TiffWriter, render: RenderRegion, width: int, height: int, mpp: float, header: str
) -> None:
    """Aperio's label (LZW) and macro (JPEG) pages: stripped, reduced-resolution, named by their description.

    The label is a printed card with a barcode-like pattern (no text, no identifiers); the macro is the glass
    slide photographed whole: the label at its left end, the tissue at a coarse scale beside it.
    """
    label = np.full((*LABEL_SHAPE, 3), 250, dtype=np.uint8)
    bars = np.random.default_rng(width * 7 + height).integers(0, 2, LABEL_SHAPE[1] // 6).repeat(6).astype(bool)
    label[40:140, : bars.size][:, bars] = 20
    tif.write(
        label,
        photometric="rgb",
        compression="lzw",
        rowsperstrip=16,
        subfiletype=1,
        description=f"{header}\r\nlabel {LABEL_SHAPE[1]}x{LABEL_SHAPE[0]}",
        metadata=None,
    )
    macro = np.full((*MACRO_SHAPE, 3), 225, dtype=np.uint8)  # the glass, a little darker than its background
    macro[:, : LABEL_SHAPE[1]] = np.asarray(
        Image.fromarray(label).resize((LABEL_SHAPE[1], MACRO_SHAPE[0]), Image.Resampling.BILINEAR)
    )
    room = (MACRO_SHAPE[0] - 20, MACRO_SHAPE[1] - LABEL_SHAPE[1] - 20)
    scale = max(width / room[1], height / room[0])
    shape = (max(1, int(height / scale)), max(1, int(width / scale)))
    macro[10 : 10 + shape[0], LABEL_SHAPE[1] + 10 : LABEL_SHAPE[1] + 10 + shape[1]] = render(0, 0, *shape, mpp * scale)
    tif.write(
        macro,
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 90},
        rowsperstrip=16,
        subfiletype=9,
        description=f"{header}\r\nmacro {MACRO_SHAPE[1]}x{MACRO_SHAPE[0]}",
        metadata=None,
    )


def _level_tiles(render: RenderRegion, height: int, width: int, tile: int, mpp: float) -> Iterator[np.ndarray]:
    """A level's (tile, tile, 3) uint8 RGB tiles in row-major order, as TIFF stores them.

    Edge tiles are rendered whole (glass, or more mirrored tissue, beyond the level's edge) rather than
    zero-padded, so their JPEG blocks have no black band.
    """
    run = max(1, _RENDER_WIDTH_PX // tile) * tile
    for top in range(0, height, tile):
        for left in range(0, width, run):
            strip = render(top, left, tile, min(run, math.ceil((width - left) / tile) * tile), mpp)
            for x in range(0, strip.shape[1], tile):
                yield strip[:, x : x + tile]
