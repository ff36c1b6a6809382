"""cuCIM: ``CuImage.read_region`` with its own worker threads and tile cache, on the levels tifffile parsed and checked.

Optional (the ``gpu`` extra; the Makefile installs its CPU reader too): ``open_slide`` takes tifffile when cuCIM is
not importable or sees another pyramid than tifffile does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from serve_app.errors import InvalidSlide
from serve_app.wsi.readers.slide import Slide, SlideLevel
from serve_app.wsi.readers.tifffile_reader import DECODE_THREADS, ParsedLevel

__all__ = ["CucimSlide"]


class CucimSlide(Slide):
    """cuCIM's reader: ``CuImage.read_region`` with its worker threads, on the levels tifffile checked."""

    reader = "cucim"

    def __init__(self, path: Path, tif: tifffile.TiffFile, parsed: tuple[ParsedLevel, ...]):
        from cucim import CuImage  # optional: open_slide falls back to tifffile when missing

        self.path = path
        self.levels = tuple(p.level for p in parsed)
        image = CuImage(str(path))
        try:
            resolutions = image.resolutions
            dimensions = [tuple(int(v) for v in d) for d in resolutions["level_dimensions"]]
            expected = [(level.width, level.height) for level in self.levels]
            if dimensions != expected:
                raise InvalidSlide(
                    f"cuCIM sees levels {dimensions}, tifffile {expected}: the readers disagree on the pyramid"
                )
            if image.typestr != "|u1" or list(image.channel_names)[:3] != ["R", "G", "B"]:
                raise InvalidSlide("cuCIM does not read the slide as 8-bit RGB")
        except BaseException:
            image.close()
            raise
        self._image = image
        self._downsamples = tuple(float(d) for d in resolutions["level_downsamples"])
        tif.close()  # cuCIM reads the pixels; the parse was only for the checks and levels

    def _read_region(self, level: SlideLevel, x: int, y: int, width: int, height: int) -> np.ndarray:
        # cuCIM's location is in level-0 pixels (as OpenSlide's); size in the level's. It fills outside with white.
        downsample = self._downsamples[level.index]
        location = (round(x * downsample), round(y * downsample))
        region = self._image.read_region(
            location, (width, height), level=level.index, num_workers=DECODE_THREADS if width * height > 2**18 else 0
        )
        pixels = np.asarray(region)
        if pixels.shape[-1] != 3:
            pixels = pixels[..., :3]
        return np.ascontiguousarray(pixels)

    def close(self) -> None:
        self._image.close()
