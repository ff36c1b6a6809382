"""``open_slide``: the one factory. It tells the format by its signature, picks the reader for it, falls back to the
next reader where the first cannot open the slide, and refuses with one ``InvalidSlide`` that says why.

=====================================  ====================================================================
what the path is (its signature)       readers, in the order tried
=====================================  ====================================================================
a folder                               wsidicom (DICOM WSI instances), then OpenSlide (its DICOM reader)
a TIFF OpenSlide calls Aperio or       tifffile parses and checks; tifffile decodes (``AUTO_READERS``;
generic, or does not know              cuCIM when asked for)
a TIFF of another vendor (NDPI, SCN,   OpenSlide
Philips, BIF, ...)
another file OpenSlide knows (MRXS,    OpenSlide
VMS, SVSLIDE, ...)
a DICOM file                           refused: a DICOM WSI is named by its folder of instances
a ``DicomwebSlide`` (a series on a     wsidicom, over DICOMweb
configured PACS)
=====================================  ====================================================================

The reason a reader was chosen goes into ``Slide.reader_reason`` (and a WSI job's ``summary.json``). Every message
names what is wrong and what to do, never the file's name or contents, which can carry patient data.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

from serve_app.errors import InconsistentPyramid, InvalidSlide
from serve_app.wsi.readers.dicomweb_reader import DicomwebSlide
from serve_app.wsi.readers.slide import CONVERT_HINT, MAX_SINGLE_LEVEL_SIDE, Slide

__all__ = ["AUTO_READERS", "READERS", "Reader", "open_slide"]

logger = logging.getLogger(__name__)

Reader = Literal["auto", "tifffile", "cucim", "openslide", "wsidicom"]
READERS: tuple[str, ...] = get_args(Reader)[1:]
# tifffile first for the TIFFs it reads: as fast as cuCIM's CPU decoder (measured, 2 cores) and it raises on a corrupt
# tile, where cuCIM prints to stderr and returns the tile white, which a job would take for glass.
AUTO_READERS: tuple[Literal["tifffile", "cucim"], ...] = ("tifffile", "cucim")

_DICOM_HEADER_BYTES = 1 << 20  # enough for any SOP Class UID: it comes before the pixel data and the large sequences
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_TIFFFILE_VENDORS = {"aperio": "an Aperio SVS", "generic-tiff": "a tiled pyramidal TIFF"}
_VENDOR_NAMES = {
    "hamamatsu": "a Hamamatsu NDPI/VMS slide",
    "leica": "a Leica SCN slide",
    "mirax": "a 3DHISTECH MRXS slide",
    "philips": "a Philips TIFF slide",
    "ventana": "a Ventana BIF slide",
    "sakura": "a Sakura SVSLIDE slide",
    "dicom": "a DICOM WSI",
    "zeiss": "a Zeiss CZI slide",
}
_FORMATS = (
    "tiled pyramidal TIFF, Aperio SVS, Hamamatsu NDPI, 3DHISTECH MRXS, Leica SCN, Philips TIFF, Ventana BIF, "
    "or a folder of DICOM WSI instances"
)


def open_slide(path: Path | str | DicomwebSlide, *, mpp: float | None = None, reader: Reader = "auto") -> Slide:
    """Open a whole-slide image (a file, a folder of DICOM WSI instances, or a DICOM WSI series on a configured PACS);
    ``InvalidSlide`` if it cannot be used.

    ``mpp``, microns per pixel of level 0, overrides the file's own (level mpp = mpp * downsample).
    ``reader="auto"`` picks by the format (see the module's table) and falls back to the next reader where one
    cannot open the slide; a reader named is the only one tried.
    """
    if reader not in get_args(Reader):
        raise ValueError(f"reader must be one of {get_args(Reader)}, got {reader!r}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise InvalidSlide(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
    if isinstance(path, DicomwebSlide):
        return _open_dicomweb(path, mpp, reader)
    path = Path(path)
    if path.is_dir():
        return _open_folder(path, mpp, reader)
    if not path.is_file():
        raise InvalidSlide("the slide file does not exist or is not a regular file (nor a folder of DICOM instances)")
    if path.stat().st_size == 0:  # a copy that failed, not a slide in another format: no converting helps
        raise InvalidSlide("the slide file is empty (0 bytes): copy the slide again")
    with open(path, "rb") as file:
        head = file.read(132)
    if head[128:132] == b"DICM":
        raise _not_a_dicom_folder(path)
    if reader in ("tifffile", "cucim"):
        return _open_tiff(path, mpp, reader, f"the {reader} reader was asked for")
    if reader == "openslide":
        return _opened(_openslide(path, mpp), "the openslide reader was asked for")
    if reader == "wsidicom":
        raise InvalidSlide("the wsidicom reader reads a folder of DICOM WSI instances; this slide is a file")
    return _open_file(path, head, mpp)


def _open_file(path: Path, head: bytes, mpp: float | None) -> Slide:
    from serve_app.wsi.readers.openslide_reader import openslide_format

    vendor = openslide_format(path)
    tiff = head[:4] in _TIFF_MAGIC
    if tiff and (vendor is None or vendor in _TIFFFILE_VENDORS):
        what = _TIFFFILE_VENDORS.get(vendor or "", "a TIFF")
        # tifffile's refusals (truncated, not RGB, no mpp...) stand: another reader would only fail later, mid-job.
        return _open_tiff(path, mpp, "auto", f"{what}: tifffile reads its tiles directly (medserve's fast path)")
    if vendor is None and path.suffix.lower() == ".mrxs" and not (path.with_suffix("") / "Slidedat.ini").is_file():
        # OpenSlide knows an MRXS by its folder: without it, the .mrxs file alone is in no format it knows.
        raise InvalidSlide(
            "a 3DHISTECH MRXS slide is its .mrxs file and the folder of the same name beside it (Slidedat.ini and the "
            "data files), and that folder is missing: copy or upload the folder with the file"
        )
    if vendor is None:
        raise InvalidSlide(
            f"the file is not a slide this server reads: not a TIFF, not DICOM, and in no format OpenSlide knows; "
            f"whole-slide images must be {_FORMATS}, or {CONVERT_HINT}"
        )
    what = _VENDOR_NAMES.get(vendor, f"a slide of OpenSlide's {vendor!r} format")
    attempts = [("OpenSlide", lambda: _openslide(path, mpp))]
    if tiff:  # a vendor's TIFF is still a TIFF: tifffile may read its pyramid where OpenSlide cannot
        attempts.append(("tifffile", lambda: _open_tiff(path, mpp, "tifffile", "")))
    return _first_that_opens(attempts, f"{what}: OpenSlide reads this scanner's layout")


def _first_that_opens(attempts: list[tuple[str, Callable[[], Slide]]], why: str) -> Slide:
    """The slide as the first of ``attempts`` that opens it gives it, ``why`` saying so; else the first refusal."""
    first: tuple[str, InvalidSlide] | None = None
    for name, attempt in attempts:
        try:
            slide = attempt()
            _check_levels_agree(slide)
        except InconsistentPyramid:
            raise  # another reader that opens it would read a wrong image
        except InvalidSlide as error:
            logger.info("the %s reader could not open a slide (%s)", name, type(error.__cause__ or error).__name__)
            first = first or (name, error)
            continue
        if first is not None:
            why = f"{why}, but {first[0]} could not open it ({first[1].reason}): {name} did"
        return _opened(slide, why)
    assert first is not None
    if len(attempts) == 1:
        raise first[1]
    others = " or ".join(name for name, _ in attempts[1:])
    raise InvalidSlide(f"{first[1].reason} ({others} could not read it either)") from first[1]


def _open_tiff(path: Path, mpp: float | None, reader: Literal["auto", "tifffile", "cucim"], why: str) -> Slide:
    from serve_app.wsi.readers.tifffile_reader import TiffSlide, parse_tiff

    tif, parsed = parse_tiff(path, mpp)
    if reader == "tifffile" or (reader == "auto" and AUTO_READERS[0] == "tifffile"):
        return _opened(TiffSlide(path, tif, parsed), why)
    from serve_app.wsi.readers.cucim_reader import CucimSlide

    try:
        return _opened(CucimSlide(path, tif, parsed), why)
    except Exception as error:
        if reader == "cucim":
            tif.close()
            if isinstance(error, InvalidSlide):
                raise
            raise InvalidSlide(
                f"cuCIM cannot read this slide ({type(error).__name__}); read it with the tifffile reader"
            ) from error
        logger.debug("cuCIM not used for a slide, tifffile reads it (%s)", type(error).__name__)  # never its message
        return _opened(TiffSlide(path, tif, parsed), f"{why}; cuCIM could not ({type(error).__name__})")


def _open_folder(folder: Path, mpp: float | None, reader: Reader) -> Slide:
    if reader not in ("auto", "wsidicom", "openslide"):
        raise InvalidSlide(f"the {reader} reader reads slide files; this slide is a folder")
    files = sorted(entry for entry in folder.iterdir() if entry.is_file())
    if not files:
        raise InvalidSlide("the slide folder is empty: a DICOM WSI folder holds the slide's instances (.dcm files)")
    dicom_files = [file for file in files if _is_dicom(file)]
    if not dicom_files:
        raise InvalidSlide(
            "the slide folder holds no DICOM files: a folder names a DICOM WSI, its instances in it; other formats "
            "are named by their file"
        )
    why = "a folder of DICOM WSI instances: wsidicom reads DICOM WSI (TILED_FULL and TILED_SPARSE, concatenations)"
    attempts: list[tuple[str, Callable[[], Slide]]] = [
        ("wsidicom", lambda: _wsidicom(folder, mpp)),
        ("OpenSlide", lambda: _openslide(folder, mpp, opened_from=dicom_files[0])),
    ]
    if reader != "auto":
        attempts = [attempt for attempt in attempts if attempt[0].lower() == reader]
        why = f"the {reader} reader was asked for"
    return _first_that_opens(attempts, why)


def _open_dicomweb(source: DicomwebSlide, mpp: float | None, reader: Reader) -> Slide:
    from serve_app.wsi.readers.dicomweb_reader import WsiDicomWebSlide

    if reader not in ("auto", "wsidicom"):
        raise InvalidSlide(f"the {reader} reader reads slide files; a slide on a PACS is read by wsidicom")
    why = f"a DICOM WSI series on PACS {source.pacs}: wsidicom reads it over DICOMweb, frames fetched as needed"
    return _opened(WsiDicomWebSlide(source, mpp), why)


def _check_levels_agree(slide: Slide) -> None:
    """Refuse (and close) a slide whose levels disagree on its shape: a level's width and height reduced from level 0's
    by different factors (more than rounding, two pixels, apart), as a pyramid put together from several images is."""
    base = slide.levels[0]
    for level in slide.levels[1:]:
        across, down = base.width / level.width, base.height / level.height
        if abs(base.width / down - level.width) > 2 or abs(base.height / across - level.height) > 2:
            slide.close()
            raise InconsistentPyramid(
                f"the slide's pyramid levels disagree on its size: level {level.index} is {level.width}x{level.height} "
                f"px, which is not level 0's {base.width}x{base.height} px reduced by one factor"
            )


def _opened(slide: Slide, why: str) -> Slide:
    _check_levels_agree(slide)
    slide.reader_reason = why
    level0 = slide.levels[0]
    if len(slide.levels) == 1 and max(level0.width, level0.height) > MAX_SINGLE_LEVEL_SIDE:
        slide.reader_notes = (
            *slide.reader_notes,
            f"the slide has one resolution level ({level0.width}x{level0.height} px): the low-resolution image for "
            "tissue detection and the overlay is made from it, read in bands (slower than a pyramid's level; "
            f"{CONVERT_HINT} to make one)",
        )
    return slide


def _openslide(path: Path, mpp: float | None, *, opened_from: Path | None = None) -> Slide:
    from serve_app.wsi.readers.openslide_reader import OpenSlideSlide

    return OpenSlideSlide(path, mpp, opened_from=opened_from)


def _wsidicom(folder: Path, mpp: float | None) -> Slide:
    from serve_app.wsi.readers.wsidicom_reader import WsiDicomSlide

    return WsiDicomSlide(folder, mpp)


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(132)[128:132] == b"DICM"


def _not_a_dicom_folder(path: Path) -> InvalidSlide:
    """A single DICOM file: a slide's instance (name its folder) or no slide at all (say what it is)."""
    import pydicom

    try:
        # From bytes, not the path: pydicom's warnings and log lines name the file they read.
        with open(path, "rb") as file, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = io.BytesIO(file.read(_DICOM_HEADER_BYTES))
            sop_class = pydicom.dcmread(header, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID
    except Exception as error:
        logger.info("a DICOM file given as a slide is unreadable (%s)", type(error).__name__)
        return InvalidSlide("the file is DICOM but its header cannot be read: the file is corrupt or truncated")
    if sop_class != "1.2.840.10008.5.1.4.1.1.77.1.6":  # VL Whole Slide Microscopy Image Storage
        return InvalidSlide(
            f"the DICOM file is not a whole-slide image (its SOP class is {sop_class.name}); a DICOM WSI is VL Whole "
            "Slide Microscopy Image Storage"
        )
    return InvalidSlide(
        "the file is one instance of a DICOM whole-slide image: name the folder that holds the slide's instances"
    )
