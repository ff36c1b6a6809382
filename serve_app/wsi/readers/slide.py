"""What every reader gives: ``Slide`` (levels, ``read_region``, ``thumbnail``), ``SlideLevel``, and the one place
library errors become ``InvalidSlide``."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from serve_app.errors import InvalidSlide

if TYPE_CHECKING:
    import pydicom

__all__ = [
    "BAND_PIXELS",
    "CONVERT_HINT",
    "MAX_SINGLE_LEVEL_SIDE",
    "MPP_HINT",
    "WHITE",
    "Slide",
    "SlideLevel",
    "paste_inside",
    "read_level_reduced",
    "slide_errors",
]

logger = logging.getLogger(__name__)

# A slide of one level larger than this has no low-resolution level for tissue detection and thumbnails: they are made
# from level 0, read in bands of at most BAND_PIXELS pixels (48 MiB of RGB), so that memory stays bounded.
MAX_SINGLE_LEVEL_SIDE = 4096
BAND_PIXELS = 1 << 24
CONVERT_HINT = "convert it with `vips tiffsave in.svs out.tif --tile --pyramid --compression jpeg`"
MPP_HINT = "give the slide's mpp (medserve wsi submit --mpp 0.25)"
WHITE = 255  # outside a level, and tiles the file leaves out, are glass


@dataclass(frozen=True)
class SlideLevel:
    """One level of a slide's pyramid."""

    index: int  # 0 = full resolution
    width: int  # pixels of this level
    height: int
    downsample: float  # level-0 pixels per pixel of this level
    mpp: float  # microns per pixel of this level
    tile_width: int  # the file's own tile grid at this level, pixels
    tile_height: int


@contextmanager
def slide_errors(doing: str) -> Iterator[None]:
    """The one place library errors become ``InvalidSlide``: ``doing`` says what failed ("opening the slide").

    Only the error's class is logged and returned: a library's message may name the file, and a file's name
    may hold a patient's.
    """
    try:
        yield
    except InvalidSlide:
        raise
    except MemoryError:
        raise
    except Exception as error:
        logger.info("slide unusable while %s (%s)", doing, type(error).__name__)
        raise InvalidSlide(
            f"the slide could not be read while {doing} ({type(error).__name__}): the file is corrupt, truncated "
            f"or in a layout this server does not read; re-export it as a tiled pyramidal TIFF, e.g. {CONVERT_HINT}"
        ) from error


def read_level_reduced(slide: Slide, level_index: int, factor: int) -> np.ndarray:
    """(ceil(H / factor), ceil(W / factor), 3) uint8 RGB: the level box-averaged over factor x factor pixels.

    Read in bands of whole rows, each at most ``BAND_PIXELS`` pixels (and at least ``factor`` rows), so that a large
    level, a one-level slide's above all, is never in memory whole: only one band and the reduced image are.
    """
    level = slide.levels[level_index]
    if factor == 1 and level.width * level.height <= BAND_PIXELS:
        return slide.read_region(level_index, 0, 0, level.width, level.height)
    out_width = math.ceil(level.width / factor)
    if factor * out_width * factor > BAND_PIXELS:  # not even one band of `factor` rows fits the bound
        raise InvalidSlide(
            f"the slide is too large to reduce within the memory bound: its level of {level.width}x{level.height} px "
            f"would be read {factor} rows at a time, {factor * out_width * factor / 1e6:.1f} Mpx, over the "
            f"{BAND_PIXELS / 1e6:.1f} Mpx a band may hold; {CONVERT_HINT} to make a pyramid"
        )
    band_rows = max(1, BAND_PIXELS // (out_width * factor * factor)) * factor  # a multiple of factor
    out = np.empty((math.ceil(level.height / factor), out_width, 3), np.uint8)
    for top in range(0, level.height, band_rows):
        rows = min(band_rows, level.height - top)
        rows_padded = math.ceil(rows / factor) * factor
        band = slide.read_region(level_index, 0, top, out_width * factor, rows_padded)  # white past the edge
        out[top // factor : (top + rows_padded) // factor] = (
            Image.fromarray(band).reduce(factor) if factor > 1 else band
        )
    return out


class Slide(ABC):
    """An open slide: its pyramid levels, and regions of them as RGB pixels. Use as a context manager.

    ``reader`` names the library that reads it; ``reader_reason`` says why ``open_slide`` chose it, and
    ``reader_notes`` what the reader left out (other focal planes or optical paths, say).
    """

    path: Path
    reader: str  # "tifffile", "cucim", "openslide" or "wsidicom"
    levels: tuple[SlideLevel, ...]  # level 0 first, the pyramid only
    reader_reason: str = ""
    reader_notes: tuple[str, ...] = ()

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 RGB of ``level``, (x, y) its top-left in that level's pixels.

        Pixels outside the level are white (glass).
        """
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level must be in [0, {len(self.levels)}), got {level}")
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width} x {height}")
        with slide_errors(f"reading a region of level {level}"):
            return self._read_region(self.levels[level], int(x), int(y), int(width), int(height))

    @abstractmethod
    def _read_region(self, level: SlideLevel, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``read_region`` of the reader, its arguments checked."""

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """(H, W, 3) uint8 RGB of the whole slide, its longer side ``max_side`` (or the coarsest level's, if smaller).

        Made from the coarsest level that is at least ``max_side`` on its longer side, not from the
        file's thumbnail page, whose extent scanners do not always match to the pyramid's.
        """
        level = self.levels[-1]
        for candidate in self.levels:
            if max(candidate.width, candidate.height) >= max_side:
                level = candidate  # levels run fine to coarse: the last one still large enough
        scale = max_side / max(level.width, level.height)
        if level.width * level.height > BAND_PIXELS:  # a one-level slide, say: reduced band by band first
            image = read_level_reduced(self, level.index, max(1, math.floor(1 / scale)))
        else:
            image = self.read_region(level.index, 0, 0, level.width, level.height)
        if scale >= 1:
            return image
        size = (max(1, round(level.width * scale)), max(1, round(level.height * scale)))
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))

    def dicom_source(self) -> pydicom.Dataset | None:
        """The DICOM image a slide read from DICOM WSI is (its base level's header), for results that reference
        it; None for a slide of another format."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release the file and the reader's threads."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        level0 = self.levels[0]
        return (
            f"{type(self).__name__}({level0.width}x{level0.height} px, {len(self.levels)} levels, "
            f"{level0.mpp:g} mpp, reader={self.reader!r})"
        )


def paste_inside(level: SlideLevel, x: int, y: int, width: int, height: int, read) -> np.ndarray:
    """A region of ``level`` on white: ``read(x0, y0, w, h)`` gives the part inside the level, (h, w, 3) uint8.

    For readers that refuse (or pad unpredictably) regions reaching beyond a level's edge.
    """
    out = np.full((height, width, 3), WHITE, dtype=np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, level.width), min(y + height, level.height)
    if x0 < x1 and y0 < y1:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = read(x0, y0, x1 - x0, y1 - y0)
    return out
