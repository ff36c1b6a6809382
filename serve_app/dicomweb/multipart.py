"""A ``multipart/related`` body of DICOM instances (DICOMweb's STOW-RS request, WADO-RS answer) written to files
as it streams in, part by part, with python-multipart's parser: never held in memory.

Whether the body ended with its closing boundary is kept (``complete``): a body cut short, by a client or
by a PACS that died half-way, is told apart from a whole one only by it, since a close-delimited HTTP
answer (Orthanc's) ends the same way either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

from serve_app.studies.upload import UploadBudget

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


class DicomPartFiles:
    """The parts of one multipart body, each written to a file of ``folder`` (``000000``, ``000001``, ...) as
    the body streams in through ``write``; bytes and files counted against ``budget``.

    ``write`` raises python-multipart's ``MultipartParseError`` for a malformed body and ``PayloadTooLarge``
    over the budget; the caller translates the first and deletes ``folder`` on either.

    Usage::

        with DicomPartFiles(boundary, folder, budget) as parts:
            for chunk in body:
                parts.write(chunk)
        if not parts.complete: ...  # cut short
    """

    def __init__(self, boundary: bytes, folder: Path, budget: UploadBudget):
        self.folder, self.budget = Path(folder), budget
        self.paths: list[Path] = []
        self.complete = False
        self._file: BinaryIO | None = None
        callbacks = {"on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end_part}
        self._parser = MultipartParser(boundary, {**callbacks, "on_end": self._end})

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def __enter__(self) -> DicomPartFiles:
        return self

    def __exit__(self, *exc_info) -> None:
        self._end_part()

    def _begin(self) -> None:
        self._end_part()
        self.budget.spend_files(1)
        path = self.folder / f"{len(self.paths):06d}"
        self.paths.append(path)
        self._file = open(path, "wb")  # closed at the part's end, or when the body is left

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.budget.spend_bytes(end - start)
        self._file.write(data[start:end])

    def _end_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _end(self) -> None:
        self.complete = True
