"""tifffile: tiled pyramidal TIFFs (Aperio SVS and generic layouts) parsed, checked, and their tiles decoded.

Every TIFF slide that tifffile or cuCIM reads is parsed and checked here once, at open: that one parse gives the
levels (the pyramid only, never thumbnail, label or macro pages), their microns per pixel, and the integrity check
that makes a truncated file fail at open rather than decode to garbage (cuCIM opens a file cut in half as a one-level
slide and fails only at the first missing tile).

``TiffSlide`` reads only the file tiles a region touches, with ``os.pread`` on one open file descriptor (thread-safe,
no seek), and decodes them in a thread pool; JPEG decoding releases the GIL. ``jpeg_tiles`` hands the same tiles,
undecoded, to a GPU decoder (``serve_app/wsi/cuda_regions.py``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from serve_app.errors import InvalidSlide
from serve_app.wsi.readers.slide import (
    CONVERT_HINT,
    MPP_HINT,
    WHITE,
    Slide,
    SlideLevel,
    slide_errors,
)

__all__ = ["DECODE_THREADS", "JpegTile", "ParsedLevel", "TiffSlide", "parse_tiff"]

logger = logging.getLogger(__name__)

_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
_MICRONS_PER_UNIT = {tifffile.RESUNIT.CENTIMETER: 1e4, tifffile.RESUNIT.INCH: 25_400.0}
DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class ParsedLevel:
    """A pyramid level as the TIFF file stores it: where its tiles are, how to decode them."""

    level: SlideLevel
    page: tifffile.TiffPage  # keyframe: its decode function and JPEGTables
    offsets: np.ndarray  # (tiles_down * tiles_across,) int64 file offsets, row-major
    bytecounts: np.ndarray  # (tiles_down * tiles_across,) int64
    tiles_across: int
    tiles_down: int


def parse_tiff(path: Path, mpp_override: float | None) -> tuple[tifffile.TiffFile, tuple[ParsedLevel, ...]]:
    """The open TiffFile and its checked pyramid levels; ``InvalidSlide`` for anything unusable."""
    with slide_errors("opening the slide"):
        try:
            tif = tifffile.TiffFile(path)
        except tifffile.TiffFileError as error:
            raise InvalidSlide(
                "the slide is not a TIFF file (no TIFF header); whole-slide images must be tiled pyramidal "
                f"TIFF (Aperio SVS or generic): {CONVERT_HINT}"
            ) from error
        try:
            return tif, _parse_levels(tif, path.stat().st_size, mpp_override)
        except BaseException:
            tif.close()
            raise


def _parse_levels(tif: tifffile.TiffFile, file_size: int, mpp_override: float | None) -> tuple[ParsedLevel, ...]:
    _check_ifd_chain_complete(tif, file_size)
    if not tif.series:
        raise InvalidSlide("the TIFF file holds no image")
    pages = [series_level.keyframe for series_level in tif.series[0].levels]
    base = pages[0]
    _check_rgb(base)
    if not base.is_tiled:
        raise InvalidSlide(f"the slide is not a tiled pyramid (its image is stored in strips); {CONVERT_HINT}")
    mpp0 = mpp_override if mpp_override is not None else _mpp_of(tif, base)
    if mpp0 is None:
        raise InvalidSlide(f"the slide has no resolution metadata (microns per pixel); {MPP_HINT}")

    # The pyramid: tiled RGB pages of level 0's aspect, each coarser than the one before. Anything else in
    # the series (a thumbnail or label taken for a level) is not a level.
    parsed: list[ParsedLevel] = []
    for page in pages:
        height, width = int(page.imagelength), int(page.imagewidth)
        downsample = (base.imagewidth / width + base.imagelength / height) / 2
        if parsed and (
            not page.is_tiled
            or downsample <= parsed[-1].level.downsample * 1.01
            or abs(base.imagewidth / width - base.imagelength / height) > 0.02 * downsample + 2 / min(width, height)
        ):
            logger.debug("page of %dx%d px is not a pyramid level, skipped", width, height)
            continue
        _check_rgb(page)
        level = SlideLevel(
            index=len(parsed),
            width=width,
            height=height,
            downsample=downsample,
            mpp=mpp0 * downsample,
            tile_width=int(page.tilewidth),
            tile_height=int(page.tilelength),
        )
        parsed.append(_tile_index(level, page, file_size))
    return tuple(parsed)


def _check_rgb(page: tifffile.TiffPage) -> None:
    if page.dtype != np.uint8:
        raise InvalidSlide(
            f"the slide has {page.bitspersample}-bit samples ({page.dtype}); expected 8-bit RGB brightfield "
            "(fluorescence and other multi-channel images are not supported)"
        )
    rgb = page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
    if not rgb or page.samplesperpixel not in (3, 4):
        raise InvalidSlide(
            f"the slide is not RGB (photometric {page.photometric.name}, {page.samplesperpixel} samples per "
            "pixel); expected 8-bit RGB brightfield, not greyscale or multi-channel"
        )


def _check_ifd_chain_complete(tif: tifffile.TiffFile, file_size: int) -> None:
    """A file cut short loses its later pages silently (tifffile logs and stops): check the last page's
    pointer to the next one, which is 0 in a whole file."""
    last = tif.pages[len(tif.pages) - 1]  # len() indexes every page, stopping at the first broken pointer
    header = tif.tiff
    fh = tif.filehandle
    fh.seek(last.offset)
    (tag_count,) = struct.unpack(header.tagnoformat, fh.read(header.tagnosize))
    fh.seek(last.offset + header.tagnosize + tag_count * header.tagsize)
    raw = fh.read(header.offsetsize)
    next_offset = struct.unpack(header.offsetformat, raw)[0] if len(raw) == header.offsetsize else file_size
    if next_offset != 0 and next_offset >= file_size:
        raise InvalidSlide("the slide file is truncated (it ends before its last page); copy or upload it again")


def _tile_index(level: SlideLevel, page: tifffile.TiffPage, file_size: int) -> ParsedLevel:
    """The level's tile offsets, checked to lie within the file: a truncated file fails here, at open."""
    tiles_across = math.ceil(level.width / level.tile_width)
    tiles_down = math.ceil(level.height / level.tile_height)
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    bytecounts = np.asarray(page.databytecounts, dtype=np.int64)
    if page.planarconfig != tifffile.PLANARCONFIG.CONTIG or page.imagedepth != 1:
        raise InvalidSlide("the slide stores colour planes separately or in depth; expected interleaved RGB tiles")
    if offsets.size != tiles_across * tiles_down or bytecounts.size != offsets.size:
        raise InvalidSlide(
            f"level {level.index} of the slide has {offsets.size} tiles, expected {tiles_across * tiles_down}: "
            "the file is corrupt"
        )
    if offsets.size and (np.any(offsets < 0) or np.any(offsets + bytecounts > file_size)):
        raise InvalidSlide(
            f"the slide file is truncated or corrupt: tiles of level {level.index} lie beyond its end; "
            "copy or upload it again"
        )
    return ParsedLevel(level, page, offsets, bytecounts, tiles_across, tiles_down)


def _mpp_of(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> float | None:
    """Microns per pixel of level 0: Aperio's ``MPP =``, else the resolution tags; None if neither says.

    A resolution of 1 pixel per unit, or unit NONE, is a writer's default, not a measurement.
    """
    match = _APERIO_MPP.search(page.description or "") if page.is_svs else None
    if match:
        try:
            value = float(match.group(1))
        except ValueError:
            value = 0.0
        if math.isfinite(value) and value > 0:
            return value
    unit = page.tags.valueof("ResolutionUnit", tifffile.RESUNIT.INCH)  # TIFF's default unit is the inch
    resolution = page.tags.valueof("XResolution")
    if resolution is None or unit not in _MICRONS_PER_UNIT:
        return None
    numerator, denominator = resolution
    if denominator == 0 or numerator == 0:
        return None
    pixels_per_unit = numerator / denominator
    if pixels_per_unit <= 1:
        return None
    return _MICRONS_PER_UNIT[unit] / pixels_per_unit


def _tiles_touching(level: SlideLevel, x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """(row, col) of the file tiles that the box [x0, x1) x [y0, y1) of ``level`` (inside it) touches."""
    tw, th = level.tile_width, level.tile_height
    return [(row, col) for row in range(y0 // th, (y1 - 1) // th + 1) for col in range(x0 // tw, (x1 - 1) // tw + 1)]


@dataclass(frozen=True)
class JpegTile:
    """One file tile as a whole JPEG stream, and its top-left in its level's pixels."""

    left: int
    top: int
    stream: bytes


class TiffSlide(Slide):
    """Decodes the file tiles a region touches, in parallel threads, with tifffile's decoders."""

    reader = "tifffile"

    def __init__(self, path: Path, tif: tifffile.TiffFile, parsed: tuple[ParsedLevel, ...]):
        self.path = path
        self.levels = tuple(p.level for p in parsed)
        self._tif = tif  # kept open: its pages' decode functions and JPEGTables
        self._parsed = parsed
        self._fd = os.open(path, os.O_RDONLY)  # pread on one descriptor: thread-safe, no shared file position
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _decoder_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="slide-decode")
            return self._pool

    def _read_region(self, level: SlideLevel, x: int, y: int, width: int, height: int) -> np.ndarray:
        parsed = self._parsed[level.index]
        out = np.full((height, width, 3), WHITE, dtype=np.uint8)
        # The part of the region inside the level, and the file tiles it touches.
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level.width), min(y + height, level.height)
        if x0 >= x1 or y0 >= y1:
            return out
        tw, th = level.tile_width, level.tile_height
        tiles = _tiles_touching(level, x0, y0, x1, y1)

        def paste(row_col: tuple[int, int]) -> None:
            row, col = row_col
            tile = self._decode_tile(parsed, row * parsed.tiles_across + col)
            if tile is None:
                return  # a tile the file leaves out: glass
            # Intersection of the tile with the region, clipped to the level (edge tiles are padded).
            left, top = col * tw, row * th
            a0, a1 = max(left, x0), min(left + tw, x1)
            b0, b1 = max(top, y0), min(top + th, y1)
            out[b0 - y : b1 - y, a0 - x : a1 - x] = tile[b0 - top : b1 - top, a0 - left : a1 - left, :3]

        if len(tiles) == 1:
            paste(tiles[0])
        else:
            # list() re-raises the first decode error here, in the caller's slide_errors.
            list(self._decoder_pool().map(paste, tiles))
        return out

    def jpeg_tiles(self, level: int, x: int, y: int, width: int, height: int) -> list[JpegTile] | None:
        """The file tiles a region of ``level`` touches, as self-contained JPEG streams (the file's shared
        JPEGTables spliced in), for decoders that take whole JPEG files (nvJPEG); None when the level is
        not JPEG-compressed. Tiles the file leaves out are left out here too (they are glass)."""
        parsed = self._parsed[level]
        page = parsed.page
        if page.compression != tifffile.COMPRESSION.JPEG:
            return None
        lv = parsed.level
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        if x0 >= x1 or y0 >= y1:
            return []
        tables = page.jpegtables
        found = []
        for row, col in _tiles_touching(lv, x0, y0, x1, y1):
            index = row * parsed.tiles_across + col
            count = int(parsed.bytecounts[index])
            if count == 0:
                continue
            data = os.pread(self._fd, count, int(parsed.offsets[index]))
            if len(data) != count:
                raise InvalidSlide("the slide file is truncated: a tile lies beyond its end; copy or upload it again")
            # An abbreviated stream: the tables' SOI..(no EOI) then the tile after its own SOI.
            found.append(
                JpegTile(col * lv.tile_width, row * lv.tile_height, tables[:-2] + data[2:] if tables else data)
            )
        return found

    def _decode_tile(self, parsed: ParsedLevel, index: int) -> np.ndarray | None:
        """(tile_height, tile_width, samples) uint8 of one file tile, or None if the file leaves it out."""
        count = int(parsed.bytecounts[index])
        if count == 0:
            return None
        data = os.pread(self._fd, count, int(parsed.offsets[index]))
        if len(data) != count:
            raise InvalidSlide("the slide file is truncated: a tile lies beyond its end; copy or upload it again")
        page = parsed.page
        segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables, _fullsize=True)
        if segment is None:
            return None
        return segment[0]  # (1, h, w, samples): one depth plane

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tif.close()
