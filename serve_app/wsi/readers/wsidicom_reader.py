"""wsidicom: DICOM whole-slide images (VL Whole Slide Microscopy Image Storage), a folder of instances per slide.

A DICOM WSI is a series: one instance per pyramid level (or several, concatenated), plus label, overview and
thumbnail instances. wsidicom reads both tile layouts (TILED_FULL, frames in row-major order; TILED_SPARSE, each
frame's position in its per-frame functional groups), concatenations, and pyramids whose levels skip a factor of
two. What a job reads of it:

- the first pyramid when the folder holds several (``reader_notes`` says so);
- of several optical paths (fluorescence channels, or brightfield scanned twice) the first by identifier, and of
  several focal planes the first (lowest z), on every level (``reader_notes`` names what there was and what was read);
- only 8-bit RGB (YBR or RGB photometric interpretations) brightfield images.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom

from serve_app.errors import InconsistentPyramid, InvalidSlide
from serve_app.wsi.readers.slide import (
    MPP_HINT,
    Slide,
    SlideLevel,
    paste_inside,
    slide_errors,
)

if TYPE_CHECKING:
    from wsidicom import WsiDicom

__all__ = ["WsiDicomSlide"]

logger = logging.getLogger(__name__)


class _WithoutFileNames(logging.Handler):
    """wsidicom's log lines name the files they are about ("Non-supported file <path>"), and so do those of fsspec,
    which opens its files ("open file: <path>"); a file's name may hold a patient's. Each is logged again here with
    its library, level and module, its message and traceback withheld."""

    def emit(self, record: logging.LogRecord) -> None:
        logger.log(
            record.levelno,
            "%s %s in %s (its message is withheld: it may name a file)",
            record.name.split(".")[0],
            record.levelname.lower(),
            record.module,
        )


# Their modules' loggers propagate to these two, and from there only through this handler.
for _library in ("wsidicom", "fsspec"):
    logging.getLogger(_library).addHandler(_WithoutFileNames())
    logging.getLogger(_library).propagate = False
_RGB_PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


def _check_frames_agree(pyramid) -> None:
    """Refuse a pyramid with a level on another frame of reference than the base's: an instance of another scan, which
    wsidicom puts into the pyramid all the same."""
    frames = [level.datasets[0].as_dataset().get("FrameOfReferenceUID") for level in pyramid.levels]
    if len(set(frames)) > 1:  # a level with one and another without disagree too
        raise InconsistentPyramid(
            "the slide's pyramid levels disagree on their frame of reference: its instances are of more than one "
            "scan; give the instances of one scan"
        )


class WsiDicomSlide(Slide):
    """``WsiDicom.read_region`` on the first pyramid of a folder of DICOM WSI instances."""

    reader = "wsidicom"

    def __init__(self, folder: Path, mpp: float | None):
        from wsidicom import WsiDicom
        from wsidicom.errors import WsiDicomNotFoundError

        self.path = folder
        with slide_errors("opening the DICOM whole-slide image with wsidicom"):
            try:
                wsi = WsiDicom.open(folder)
            except WsiDicomNotFoundError as error:
                raise InvalidSlide(
                    "the folder holds no DICOM whole-slide image levels (VL Whole Slide Microscopy instances of "
                    "image type VOLUME, with their type 1 attributes); name the folder of one slide's instances"
                ) from error
        self._take(wsi, mpp)

    def _take(self, wsi: WsiDicom, mpp: float | None) -> None:
        """Read the pyramid of ``wsi``, an opened ``WsiDicom``; closed again if it cannot be used."""
        self._wsi = wsi
        try:
            # wsidicom checks each instance's tiles lazily, as its levels are first asked about: here.
            with slide_errors("reading the DICOM whole-slide image's pyramid"):
                self.levels, self.reader_notes = self._read_pyramid(mpp)
        except BaseException:
            self._wsi.close()
            raise

    def _read_pyramid(self, mpp: float | None) -> tuple[tuple[SlideLevel, ...], tuple[str, ...]]:
        notes = []
        pyramids = len(self._wsi.pyramids)
        if pyramids > 1:
            notes.append(f"the folder holds {pyramids} pyramids (scans of the slide); the first is read")
        pyramid = self._wsi.pyramids[0]
        base = pyramid.base_level
        dataset = base.datasets[0]
        if (
            dataset.samples_per_pixel != 3
            or dataset.bits != 8
            or dataset.photometric_interpretation not in (_RGB_PHOTOMETRIC)
        ):
            raise InvalidSlide(
                f"the slide is not RGB ({dataset.photometric_interpretation}, {dataset.samples_per_pixel} samples, "
                f"{dataset.bits} bits); expected 8-bit RGB brightfield, not greyscale or multi-channel"
            )
        paths = sorted(base.optical_paths)
        self._path = paths[0]
        if len(paths) > 1:
            listed = ", ".join(repr(path) for path in paths)
            notes.append(f"the slide has {len(paths)} optical paths ({listed}); the first, {self._path!r}, is read")
        planes = sorted(base.focal_planes)
        self._z = planes[0]
        if len(planes) > 1:
            listed = ", ".join(f"{z:g}" for z in planes)
            notes.append(
                f"the slide has {len(planes)} focal planes ({listed} µm); the first, z = {self._z:g} µm, is read"
            )
        if mpp is None:
            mpp = base.mpp.width if base.mpp is not None else None
            if mpp is None or not (math.isfinite(mpp) and mpp > 0):
                raise InvalidSlide(f"the slide has no resolution metadata (Pixel Spacing); {MPP_HINT}")
        self._pyramid_levels = []  # wsidicom's index of each level: its scale, log2 of the downsample
        levels = []
        for level in pyramid.levels:
            if self._path not in level.optical_paths or self._z not in level.focal_planes:
                logger.debug("a DICOM WSI level lacks the optical path or focal plane read; skipped")
                continue
            downsample = (base.size.width / level.size.width + base.size.height / level.size.height) / 2
            levels.append(
                SlideLevel(
                    index=len(levels),
                    width=int(level.size.width),
                    height=int(level.size.height),
                    downsample=downsample,
                    mpp=mpp * downsample,
                    tile_width=int(level.tile_size.width),
                    tile_height=int(level.tile_size.height),
                )
            )
            self._pyramid_levels.append(level.level)
        _check_frames_agree(pyramid)
        result = tuple(levels)
        return result, tuple(notes)

    def _read_region(self, level: SlideLevel, x: int, y: int, width: int, height: int) -> np.ndarray:
        def read(x0: int, y0: int, w: int, h: int) -> np.ndarray:
            region = self._wsi.read_region(
                (x0, y0),
                self._pyramid_levels[level.index],
                (w, h),
                z=self._z,
                path=self._path,
                pyramid=0,
                as_array=True,
            )
            return np.asarray(region)[..., :3]

        # wsidicom refuses a region past the level's edge: read the part inside, the rest is glass.
        return paste_inside(level, x, y, width, height, read)

    def dicom_source(self) -> pydicom.Dataset:
        """The base level's first instance, its header only: what annotations of the slide reference (their
        coordinates are its total pixel matrix's, which every instance of the level shares)."""
        dataset = self._wsi.pyramids[0].base_level.datasets[0].as_dataset()
        header = pydicom.Dataset()
        for element in dataset:
            if element.tag not in _NOT_REFERENCED:
                header.add(element)
        return header

    def close(self) -> None:
        self._wsi.close()


# Per-frame positions and pixels: what an annotation's reference to the image needs none of, and the largest parts.
_NOT_REFERENCED = {pydicom.tag.Tag("PerFrameFunctionalGroupsSequence"), pydicom.tag.Tag("PixelData")}
