"""A ``multipart/related`` body of DICOM instances (DICOMweb's STOW-RS request, WADO-RS answer) written to files
as it streams in, part by part, with python-multipart's parser: never held in memory.

Whether the body ended with its closing boundary is kept (``complete``): a body cut short, by a client or
by a PACS that died half-way, is told apart from a whole one only by it, since a close-delimited HTTP
answer (Orthanc's) ends the same way either way.
"""

from __future__ import annotations

from pathlib import Path

from python_multipart.multipart import parse_options_header

from serve_app.studies.upload import PartFiles, UploadBudget

__all__ = ["DicomPartFiles", "multipart_related_boundary"]

_RELATED = b"multipart/related"
_DICOM = b"application/dicom"


def multipart_related_boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/related`` content type whose parts are ``application/dicom`` (the default
    when ``type`` is left out); None for any other content type. An empty boundary is returned as ``b""``."""
    media_type, options = parse_options_header(content_type)
    if media_type != _RELATED or options.get(b"type", _DICOM) != _DICOM:
        return None
    return options.get(b"boundary", b"")


class DicomPartFiles(PartFiles):
    """The parts of one ``multipart/related`` body of DICOM instances, every part a file of ``folder``
    (``000000``, ``000001``, ...), written as the body streams in through ``write``; the body's bytes, and the
    parts' bytes and files, counted against ``budget`` as they arrive (``PartFiles``).

    ``write`` raises python-multipart's ``MultipartParseError`` for a malformed body and ``PayloadTooLarge``
    over the budget; the caller translates the first and deletes ``folder`` on either.

    Usage::

        with DicomPartFiles(boundary, folder, budget) as parts:
            for chunk in body:
                parts.write(chunk)
        if not parts.complete: ...  # cut short
    """

    def __init__(self, boundary: bytes, folder: Path, budget: UploadBudget):
        super().__init__(boundary, folder, budget)
