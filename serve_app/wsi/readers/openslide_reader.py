"""OpenSlide: the vendor formats (Aperio SVS, Hamamatsu NDPI/VMS, 3DHISTECH MRXS, Leica SCN, Philips TIFF, Ventana
BIF, Sakura SVSLIDE, generic tiled TIFF, DICOM WSI), through ``openslide-python`` and the ``openslide-bin`` wheel.

OpenSlide is the field's reference reader: it knows each scanner's layout (NDPI's JPEG restart markers, MRXS's
folder of data files, Philips' XML description, BIF's overlapping tiles), and gives every format as one pyramid of
level sizes and downsamples with ``openslide.mpp-x``. Its regions are premultiplied RGBA, transparent where the
scanner took no image; medserve composites them on white (glass).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from serve_app.errors import InvalidSlide
from serve_app.wsi.readers.slide import MPP_HINT, Slide, SlideLevel, slide_errors

__all__ = ["OpenSlideSlide", "openslide_format"]

logger = logging.getLogger(__name__)

_DEFAULT_TILE = 256  # OpenSlide gives no tile size for some formats (MRXS, VMS): regions aligned to it still read


def openslide_format(path: Path) -> str | None:
    """The vendor OpenSlide sees in ``path`` ("aperio", "hamamatsu", "mirax", "philips", "dicom", ...), or None."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception as error:  # an unreadable file: no vendor
        logger.debug("OpenSlide cannot tell a slide's format (%s)", type(error).__name__)
        return None


class OpenSlideSlide(Slide):
    """``OpenSlide.read_region`` on the slide's levels; OpenSlide handles are safe to share between threads."""

    reader = "openslide"

    def __init__(self, path: Path, mpp: float | None, *, opened_from: Path | None = None):
        """``opened_from``: the file OpenSlide opens when ``path`` is a folder (a DICOM WSI's first instance)."""
        import openslide

        self.path = path
        with slide_errors("opening the slide with OpenSlide"):
            self._slide = openslide.OpenSlide(str(opened_from or path))
        try:
            self.vendor = self._slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
            self.levels = self._levels(mpp)
        except BaseException:
            self._slide.close()
            raise

    def _levels(self, mpp: float | None) -> tuple[SlideLevel, ...]:
        import openslide

        properties = self._slide.properties
        if mpp is None:
            try:
                mpp = float(properties[openslide.PROPERTY_NAME_MPP_X])
            except (KeyError, ValueError):
                mpp = None
            if mpp is None or not mpp > 0:
                raise InvalidSlide(f"the slide has no resolution metadata (microns per pixel); {MPP_HINT}")
        levels = []
        for index, ((width, height), downsample) in enumerate(
            zip(self._slide.level_dimensions, self._slide.level_downsamples, strict=True)
        ):
            levels.append(
                SlideLevel(
                    index=index,
                    width=int(width),
                    height=int(height),
                    downsample=float(downsample),
                    mpp=mpp * float(downsample),
                    tile_width=int(properties.get(f"openslide.level[{index}].tile-width", _DEFAULT_TILE)),
                    tile_height=int(properties.get(f"openslide.level[{index}].tile-height", _DEFAULT_TILE)),
                )
            )
        result = tuple(levels)
        return result

    def _read_region(self, level: SlideLevel, x: int, y: int, width: int, height: int) -> np.ndarray:
        # OpenSlide's location is in level-0 pixels, its size in the level's; outside the slide is transparent.
        location = (round(x * level.downsample), round(y * level.downsample))
        rgba = np.asarray(self._slide.read_region(location, level.index, (width, height)))
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        # openslide-python un-premultiplies: composite on white where the scanner left no image.
        rgb = rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha.astype(np.uint16))
        return ((rgb + 127) // 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()
