"""Which DICOM transfer syntaxes this server decodes, and the one decoder plugin it adds to pydicom's.

pydicom 3 decodes compressed pixel data through plugins, each backed by a package that the project depends on
(all permissively licensed): pylibjpeg-openjpeg (JPEG 2000, HTJ2K), pylibjpeg-rle and pydicom itself (RLE),
pyjpegls (JPEG-LS), python-gdcm (JPEG lossless, JPEG-LS, JPEG 2000, JPEG baseline) and Pillow (JPEG baseline,
JPEG 2000). No plugin of theirs decodes 12-bit JPEG Extended (1.2.840.10008.1.2.4.51, common in older CT and NM):
pydicom's GDCM and Pillow plugins refuse it, and pylibjpeg-libjpeg (which would) is GPL. imagecodecs, already a
dependency for slides, decodes it with libjpeg-turbo 3 (BSD-style licences), so this module registers it as one more
plugin for the JPEG syntaxes.

A syntax that no installed plugin decodes (MPEG, H.264, JPIP, an unknown private UID) is refused from the headers,
before any pixels are read: ``require_decoder``.
"""

from __future__ import annotations

import contextlib
import re

import imagecodecs
from pydicom import uid
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeRunner

from serve_app.errors import UnsupportedMediaType

__all__ = ["DECODER_DEPENDENCIES", "decode_jpeg_frame", "describe", "is_available", "require_decoder"]

# pydicom's plugin protocol: the packages each syntax needs, and ``is_available`` / the decoding function.
DECODER_DEPENDENCIES = {
    uid.JPEGExtended12Bit: ("imagecodecs",),
    uid.JPEGLossless: ("imagecodecs",),
    uid.JPEGLosslessSV1: ("imagecodecs",),
}
_PLUGIN = "imagecodecs"
# A UID is at most 64 digits and dots; anything else in the header is not echoed back (it could be any text).
_UID_FORM = re.compile(r"[0-9.]{1,64}")


def is_available(syntax: str) -> bool:
    """Whether imagecodecs can decode ``syntax`` here (pydicom's plugin protocol)."""
    return syntax in DECODER_DEPENDENCIES and imagecodecs.JPEG8.available


def decode_jpeg_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One grey-scale JPEG frame (baseline, extended 8/12-bit or lossless) as little-endian samples of
    ``runner.bits_allocated`` bits, row by row (pydicom's plugin protocol)."""
    if runner.samples_per_pixel != 1:
        # Colour is refused by the series reader anyway; imagecodecs would convert its colour space on the way. Any
        # exception sends pydicom on to its next plugin for the syntax.
        raise ValueError("the imagecodecs plugin decodes grey-scale JPEG only")
    pixels = imagecodecs.jpeg8_decode(src)
    return pixels.astype(f"<u{runner.bits_allocated // 8}", copy=False).tobytes()


def describe(syntax: str) -> str:
    """A transfer syntax as a reason names it: ``"JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)"``."""
    if not _UID_FORM.fullmatch(syntax):
        return "that is not a valid UID"
    name = uid.UID(syntax).name
    return f"{name} ({syntax})" if name != syntax else f"{syntax} (unknown)"


def require_decoder(syntax: str) -> None:
    """Raise ``UnsupportedMediaType`` (415) naming ``syntax`` when no installed plugin decodes its pixel data."""
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:  # pydicom knows no decoder for it at all: video, JPIP, a private UID
        available = False
    if not available:
        raise UnsupportedMediaType(
            f"the DICOM pixel data is in transfer syntax {describe(syntax)}, which this server cannot decode; "
            "send it uncompressed or in a JPEG, JPEG-LS, JPEG 2000, HTJ2K or RLE syntax"
        )


def _register() -> None:
    """Add imagecodecs as a plugin for its JPEG syntaxes, once a process: pydicom's decoders are global."""
    for syntax in DECODER_DEPENDENCIES:
        with contextlib.suppress(ValueError):  # added already: this module was reloaded
            get_decoder(syntax).add_plugin(_PLUGIN, (__name__, decode_jpeg_frame.__name__))


_register()
