"""Open whole-slide images and read regions of their pyramid levels: what the rest of medserve imports.

``open_slide`` picks the reader for the slide's format and says why (``serve_app/wsi/readers/factory.py``); every
reader gives the same ``Slide``: its levels (the pyramid only, never thumbnail, label or macro images), their
microns per pixel, and ``read_region`` as RGB, white outside the level. One module per library in
``serve_app/wsi/readers/``: tifffile, cuCIM, OpenSlide, wsidicom (a folder, or a series on a PACS by DICOMweb).
"""

from serve_app.errors import InvalidSlide
from serve_app.wsi.readers.cucim_reader import CucimSlide
from serve_app.wsi.readers.dicomweb_reader import DicomwebSlide, WsiDicomWebSlide
from serve_app.wsi.readers.factory import AUTO_READERS, READERS, Reader, open_slide
from serve_app.wsi.readers.openslide_reader import OpenSlideSlide
from serve_app.wsi.readers.slide import MAX_SINGLE_LEVEL_SIDE, Slide, SlideLevel, read_level_reduced
from serve_app.wsi.readers.tifffile_reader import JpegTile, TiffSlide
from serve_app.wsi.readers.wsidicom_reader import WsiDicomSlide

__all__ = [
    "AUTO_READERS",
    "MAX_SINGLE_LEVEL_SIDE",
    "READERS",
    "CucimSlide",
    "DicomwebSlide",
    "InvalidSlide",
    "JpegTile",
    "OpenSlideSlide",
    "Reader",
    "Slide",
    "SlideLevel",
    "TiffSlide",
    "WsiDicomSlide",
    "WsiDicomWebSlide",
    "open_slide",
    "read_level_reduced",
]
