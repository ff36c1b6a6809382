"""An upload, from the request's body to sorted DICOM and NIfTI files on disk.

``spool_request`` (in the ingress) streams the body to files in the request's upload folder;
``sort_upload`` (in preprocessing) unpacks zip archives safely and sorts the files. One
``UploadBudget`` bounds the whole upload across both: bytes written and files, over every
part and every archive of the request. Every byte is counted as it arrives, whether the body declares its length
or comes chunked: a multipart body is parsed as it streams (``PartFiles``), each part written to its own file, never
spooled whole anywhere first. An archive's entry count and directory size are read from its end record and
refused over the budget before its directory is parsed. A DICOM file stored uncompressed in an archive (what a
PACS export or a ``zip -0`` holds) is not unpacked: its CRC-32 checked, it is read where it lies (``DicomFile``).

Files are told apart by their bytes, not their names: hospital exports name files anything.

A single-file body may come compressed as a whole (``Content-Encoding: gzip`` or ``zstd``): it is spooled as sent,
then decoded into the upload folder in bounded reads, each counted against the budget before it is written, so
that a small body that decodes to terabytes is refused at the limit.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import mmap
import os
import struct
import threading
import zipfile
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import zstandard
from isal import igzip, isal_zlib
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from serve_app.config import LimitsConfig
from serve_app.errors import (
    BadRequest,
    InvalidStudy,
    PayloadTooLarge,
    RequestError,
    UnsupportedContentEncoding,
    UnsupportedMediaType,
)

__all__ = ["DicomFile", "PartFiles", "UploadBudget", "UploadContents", "sniff", "sort_upload", "spool_request"]

_CHUNK = 1 << 20
# An archive's entries are opened by this many threads at most (the CRC checks and copies release the GIL: a
# 300-file series unpacked in 71-92 ms against 120-152 ms in one thread, on 2 cores), each thread taking a run of at
# least _MIN_ENTRIES_PER_THREAD.
_UNZIP_THREADS = 4
_MIN_ENTRIES_PER_THREAD = 16

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_LOCAL_HEADER = 30  # bytes of a zip entry's local header before its name and extra field (APPNOTE 4.3.7)
# The end of a zip's central directory (APPNOTE 4.3.16): 22 bytes, then a comment of up to 64 KiB. With ZIP64, the
# ZIP64 end record (4.3.14, 56 bytes) and its locator (4.3.15, 20 bytes) lie just before it, and hold the counts and
# sizes that do not fit the first; zipfile takes them wherever the locator is found.
_END_RECORD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")
_END_MAGIC, _ZIP64_LOCATOR_MAGIC, _ZIP64_END_MAGIC = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"
# A central directory entry (4.3.12): 46 bytes, then its name, extra field and comment, their lengths at 28, 30, 32.
_DIRECTORY_ENTRY = struct.Struct("<4s24x3H12x")
_DIRECTORY_MAGIC = b"PK\x01\x02"
# zipfile reads the whole directory into memory and makes an object of each entry: the directory may take at most
# this much per file the budget allows (names a hospital's export gives are tens of bytes).
_DIRECTORY_BYTES_PER_FILE = 1024
_ENCRYPTED = 0x1  # general purpose flag bit 0
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC = b"n+1\x00"  # at byte 344
_NIFTI2_MAGIC = b"n+2\x00"  # at byte 4
_DICOM_MAGIC = b"DICM"
# multipart/form-data fields that are not files (a browser's form may send a few) are read and dropped, up to this
# many; a part's headers are kept, to find its Content-Disposition, up to this many bytes.
_MAX_FORM_FIELDS = 1000
_MAX_PART_HEADER_BYTES = 16 * 1024
_FORM_DATA = b"multipart/form-data"
# Content-Encoding values a body may be sent with (x-gzip: RFC 9110's alias of gzip), as UnsupportedContentEncoding
# lists them.
_CONTENT_ENCODINGS = ("gzip", "x-gzip", "zstd")


class UploadBudget:
    """What one request may write to its upload folder: ``max_bytes`` in ``max_files`` files at most,
    over all its parts and everything unpacked from its archives.

    ``spend_bytes`` / ``spend_files`` raise ``PayloadTooLarge`` (413) the moment the budget is exceeded,
    before the bytes that exceed it are written; threads unpacking one archive share it.
    """

    def __init__(self, *, max_bytes: int, max_files: int):
        self.max_bytes, self.max_files = max_bytes, max_files
        self.bytes = self.files = 0
        self._lock = threading.Lock()

    @classmethod
    def of(cls, limits: LimitsConfig) -> UploadBudget:
        return cls(max_bytes=limits.max_upload_bytes, max_files=limits.max_files_per_upload)

    def spend_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n
            spent = self.bytes
        if spent > self.max_bytes:
            raise PayloadTooLarge(
                f"the upload is over this server's limit of {self.max_bytes} bytes, unpacked archives included"
            )

    def spend_files(self, n: int) -> None:
        self.files += n
        if self.files > self.max_files:
            raise PayloadTooLarge(f"the upload holds more than {self.max_files} files, unpacked archives included")


async def spool_request(request: Request, folder: Path, budget: UploadBudget) -> int:
    """Stream the request's body to files in ``folder`` (one per multipart file part, else one) without
    holding it in memory; return the bytes written.

    Raises ``PayloadTooLarge`` over the budget (a declared ``Content-Length`` over it before reading
    anything, else the moment the bytes received pass it), ``InvalidStudy`` for an empty body or a multipart body
    with no file part, ``BadRequest`` for a malformed or truncated multipart body.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > budget.max_bytes:
        raise PayloadTooLarge(f"the upload is {declared} bytes, over this server's limit of {budget.max_bytes}")
    encoding = _content_encoding(request)
    media_type, options = parse_options_header(request.headers.get("content-type", ""))
    multipart = media_type == _FORM_DATA
    if multipart and encoding:
        raise UnsupportedMediaType(
            "Content-Encoding applies to single-file bodies; compress a multipart upload's files instead (.nii.gz, zip)"
        )
    if not multipart:
        budget.spend_files(1)
        if encoding:
            await _spool_encoded(request, folder / "000000", encoding, budget)
        else:
            await _write(request.stream(), folder / "000000", budget)
        if budget.bytes == 0:
            raise InvalidStudy("the request body is empty; send a zip, DICOM files or a NIfTI image")
        return budget.bytes
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest("the multipart/form-data content type has no boundary")
    parts = PartFiles(boundary, folder, budget, fields=True)
    await parts.receive(request.stream(), "the multipart body")
    if not parts.paths:
        raise InvalidStudy("the multipart upload has no file parts")
    return budget.bytes


class PartFiles:
    """The parts of one multipart body (``multipart/form-data`` or ``multipart/related``) each written to a file of
    ``folder`` (``000000``, ``000001``, ...) as the body streams in through ``write``, with python-multipart's
    parser: never held in memory, never spooled anywhere first.

    Every byte is counted as it arrives: the body's own bytes (boundaries, part headers and dropped fields
    included) against ``budget.max_bytes``, as a declared Content-Length is; each part's bytes and files against
    ``budget`` before they are written, so that the folder never holds more than the budget. With ``fields``
    (``multipart/form-data``), a part whose Content-Disposition names no filename is a form field: read and
    dropped (at most ``_MAX_FORM_FIELDS``); else every part is a file.

    ``write`` raises python-multipart's ``MultipartParseError`` for a malformed body, ``PayloadTooLarge`` over the
    budget, ``BadRequest`` for too many fields or overlong part headers; the caller translates the first and
    deletes ``folder`` on any. Whether the body ended with its closing boundary is kept (``complete``): a body cut
    short is told apart from a whole one only by it.

    Usage::

        paths = await PartFiles(boundary, folder, budget).receive(request.stream(), "the multipart body")

        with PartFiles(boundary, folder, budget) as parts:  # a body that arrives otherwise (a client's answer)
            for chunk in body:
                parts.write(chunk)
        if not parts.complete: ...  # cut short
    """

    def __init__(self, boundary: bytes, folder: Path, budget: UploadBudget, *, fields: bool = False):
        self.folder, self.budget, self.fields = Path(folder), budget, fields
        self.paths: list[Path] = []
        self.complete = False
        self.received = 0  # bytes of the body so far
        self._skipped_fields = 0
        self._file: BinaryIO | None = None
        # The part's header being read (name, value), its headers' bytes so far, and its Content-Disposition.
        self._name, self._value = bytearray(), bytearray()
        self._header_bytes = 0
        self._disposition = b""
        callbacks = {
            "on_part_begin": self._begin_part,
            "on_header_field": partial(self._header, self._name),
            "on_header_value": partial(self._header, self._value),
            "on_header_end": self._end_header,
            "on_headers_finished": self._open_part,
            "on_part_data": self._data,
            "on_part_end": self._end_part,
            "on_end": self._end,
        }
        self._parser = MultipartParser(boundary, callbacks)

    async def receive(self, stream: AsyncIterator[bytes], body: str) -> list[Path]:
        """Every chunk of ``stream`` written and the last part closed; the parts' paths. ``BadRequest`` naming
        ``body`` (e.g. "the multipart body") for one that is malformed or ends before its closing boundary."""
        try:
            with self:
                async for chunk in stream:
                    self.write(chunk)
        except MultipartParseError:
            raise BadRequest(f"{body} is malformed") from None
        if not self.complete:
            raise BadRequest(f"{body} ends before its closing boundary")
        return self.paths

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.budget.max_bytes:
            raise PayloadTooLarge(f"the upload is over this server's limit of {self.budget.max_bytes} bytes")
        self._parser.write(chunk)

    def __enter__(self) -> PartFiles:
        return self

    def __exit__(self, *exc_info) -> None:
        self._end_part()

    def _begin_part(self) -> None:
        self._end_part()
        self._header_bytes, self._disposition = 0, b""

    def _header(self, into: bytearray, data: bytes, start: int, end: int) -> None:
        self._header_bytes += end - start
        if self._header_bytes > _MAX_PART_HEADER_BYTES:
            raise BadRequest(f"a part of the multipart body has over {_MAX_PART_HEADER_BYTES} bytes of headers")
        into += data[start:end]

    def _end_header(self) -> None:
        if self._name.strip().lower() == b"content-disposition":
            self._disposition = bytes(self._value).strip()
        self._name.clear()
        self._value.clear()

    def _open_part(self) -> None:
        if self.fields and not self._is_file():
            self._skipped_fields += 1
            if self._skipped_fields > _MAX_FORM_FIELDS:
                raise BadRequest(f"the multipart body has more than {_MAX_FORM_FIELDS} fields that are not files")
            return
        if self.budget.files >= self.budget.max_files:
            raise PayloadTooLarge(f"the multipart upload has more than {self.budget.max_files} file parts")
        self.budget.spend_files(1)
        path = self.folder / f"{len(self.paths):06d}"
        self.paths.append(path)
        self._file = open(path, "wb")  # closed at the part's end, or when the body is left

    def _is_file(self) -> bool:
        """Whether the part's Content-Disposition names a filename (as Starlette's form parser tells a file)."""
        return b"filename" in parse_options_header(self._disposition)[1]

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self.budget.spend_bytes(end - start)
            self._file.write(data[start:end])

    def _end_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _end(self) -> None:
        self.complete = True


def _content_encoding(request: Request) -> str | None:
    """The body's Content-Encoding (lower case; None for none or identity); 415 for one this server cannot decode."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return None
    if encoding not in _CONTENT_ENCODINGS:
        raise UnsupportedContentEncoding(
            f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, zstd or no encoding"
        )
    return encoding


async def _spool_encoded(request: Request, path: Path, encoding: str, budget: UploadBudget) -> None:
    """The body, sent compressed with ``encoding``, decoded to ``path``. The budget counts the bytes decoded; the
    bytes sent, on disk until decoded, are held to the same limit on their own."""
    sent = path.with_name(f"{path.name}.sent")
    try:
        await _write(request.stream(), sent, UploadBudget(max_bytes=budget.max_bytes, max_files=1))
        corrupt = BadRequest(f"the body is not valid {encoding} as its Content-Encoding says (corrupt or cut short)")
        await asyncio.to_thread(_decode_file, sent, path, encoding, budget, corrupt)
    finally:
        sent.unlink(missing_ok=True)


def _decode_file(sent: Path, path: Path, encoding: str, budget: UploadBudget, corrupt: RequestError) -> None:
    """``sent``, compressed in ``encoding`` (gzip or zstd), decoded to ``path`` in bounded reads counted against
    ``budget``; ``corrupt`` is raised where it does not decode."""
    with open(sent, "rb") as raw, open(path, "wb") as out:
        try:
            if encoding == "zstd":
                decoded = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            else:
                decoded = igzip.IGzipFile(fileobj=raw)
            with decoded:
                while chunk := decoded.read(_CHUNK):
                    budget.spend_bytes(len(chunk))
                    out.write(chunk)
        except (OSError, EOFError, zstandard.ZstdError):
            raise corrupt from None


async def _write(chunks: AsyncIterator[bytes], path: Path, budget: UploadBudget) -> None:
    with open(path, "wb") as out:
        async for chunk in chunks:
            budget.spend_bytes(len(chunk))
            out.write(chunk)


@dataclass(frozen=True)
class DicomFile:
    """A DICOM file of an upload: the whole file at ``path``, or ``size`` bytes of it from ``offset``, an entry
    stored uncompressed in a zip archive and read where it lies.

    Usage::

        with dicom_file.open() as stream:  # a binary file object that ends where the DICOM file ends
            dataset = pydicom.dcmread(stream)
    """

    path: Path
    offset: int = 0
    size: int | None = None  # None: to the end of the file

    def open(self) -> BinaryIO:
        """The file, or the archive entry as a read-only file of its own, read through a memory map (an entry may
        be gigabytes; a header parse reads a few kilobytes of it)."""
        if self.size is None:
            return open(self.path, "rb")
        return _EntryReader(self.path, self.offset, self.size)

    def read_bytes(self) -> bytes:
        with self.open() as stream:
            return stream.read()

    def unpacked(self) -> DicomFile:
        """The file itself; or the archive entry copied out by the kernel to a file beside the archive (in the
        folder its other unpacked entries go to), for what must reopen it by name."""
        if self.size is None:
            return self
        target = self.path.with_name(f"{self.path.name}.unzipped") / f"entry-at-{self.offset}"
        with open(self.path, "rb") as archive, open(target, "wb") as out:
            _copy_range(archive, self.offset, self.size, out)
        return DicomFile(target)


class _EntryReader(io.RawIOBase):
    """``size`` bytes of a file from ``offset``, read through a memory map, as a read-only file whose positions
    count from ``offset``. It has no ``name``: pydicom would reopen the whole archive by it, at the entry's
    positions, to read a deferred element."""

    def __init__(self, path: Path, offset: int, size: int):
        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # where a map may begin
        with open(path, "rb") as file:
            self._mapped = mmap.mmap(file.fileno(), offset + size - start, offset=start, access=mmap.ACCESS_READ)
        self._begin, self._size = offset - start, size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        # pydicom reads a header a few bytes at a time: one slice of the map each, not RawIOBase's readinto.
        end = self._size if size is None or size < 0 else min(self._size, self._position + size)
        data = self._mapped[self._begin + self._position : self._begin + max(end, self._position)]
        self._position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        if base + position < 0:
            raise OSError(f"negative seek position {base + position}")
        self._position = base + position
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            self._mapped.close()
        super().close()


@dataclass
class UploadContents:
    dicom: list[DicomFile] = field(default_factory=list)
    nifti: list[Path] = field(default_factory=list)


def sniff(path: Path) -> str:
    """One of ``zip``, ``nii``, ``nii.gz``, ``dicom`` or ``unknown``."""
    with open(path, "rb") as f:
        return _kind_of(f.read(352))


def _kind_of(head: bytes) -> str:
    """``sniff``'s answer for a file that begins with ``head`` (its first 352 bytes, or all of a shorter one)."""
    if head[:4] in _ZIP_MAGICS:
        return "zip"
    if head[:2] == _GZIP_MAGIC:
        return "nii.gz"
    if head[344:348] == _NIFTI1_MAGIC or head[4:8] == _NIFTI2_MAGIC:
        return "nii"
    if head[128:132] == _DICOM_MAGIC:
        return "dicom"
    return "unknown"


def sort_upload(folder: Path, limits: LimitsConfig) -> UploadContents:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise InvalidStudy("the upload is empty")
    # The spooled parts are already on disk: what archives unpack is spent from what they left.
    budget = UploadBudget.of(limits)
    budget.spend_files(len(files))
    budget.spend_bytes(sum(p.stat().st_size for p in files))
    contents = UploadContents()
    for path in files:
        kind = sniff(path)
        if kind == "zip":
            _add_zip(path, folder / f"{path.name}.unzipped", budget, contents)
        elif kind == "unknown":
            raise UnsupportedMediaType(
                "an uploaded file is not a zip archive, a DICOM file (Part 10, with the DICM preamble) or a NIfTI image"
            )
        else:
            _add_file(path, kind, contents, budget)
    if not contents.dicom and not contents.nifti:
        raise InvalidStudy("the upload's archives hold no DICOM or NIfTI files")
    if contents.dicom and contents.nifti:
        raise InvalidStudy("send either one DICOM series or one NIfTI image, not both")
    if len(contents.nifti) > 1:
        raise InvalidStudy(f"the upload holds {len(contents.nifti)} NIfTI images; send one per request")
    return contents


def _add_file(path: Path, kind: str, contents: UploadContents, budget: UploadBudget) -> None:
    if kind == "dicom":
        contents.dicom.append(DicomFile(path))
    elif kind == "nii":
        # nibabel tells plain from gzipped NIfTI by the file's extension.
        contents.nifti.append(path.rename(path.with_name(f"{path.name}.nii")))
    elif kind == "nii.gz":
        # Decoded here by ISA-L, several times faster than the zlib nibabel would read it through.
        plain = path.with_name(f"{path.name}.nii")
        _decode_file(path, plain, "gzip", budget, InvalidStudy("the gzipped NIfTI image is corrupt or cut short"))
        path.unlink()
        contents.nifti.append(plain)


def _add_zip(archive: Path, into: Path, budget: UploadBudget, contents: UploadContents) -> None:
    try:
        _check_directory(archive, budget)
        with zipfile.ZipFile(archive) as zf:
            # Not ZipInfo.is_dir: on Python 3.11 it fails on an entry with an empty name.
            entries = [e for e in zf.infolist() if not e.filename.endswith("/")]
        _check_entries(entries, budget)
        into.mkdir()
        # Entries unpacked are written under a plain counter: their names are untrusted and may carry patient
        # names, so they are neither used as paths nor ever repeated in messages.
        targets = [into / f"{n:06d}" for n in range(len(entries))]
        runs = max(1, min(_UNZIP_THREADS, len(entries) // _MIN_ENTRIES_PER_THREAD))
        bounds = [len(entries) * i // runs for i in range(runs + 1)]
        with ThreadPoolExecutor(runs) as pool:
            runs_of = itertools.pairwise(bounds)
            futures = [pool.submit(_open_entries, archive, entries[a:b], targets[a:b], budget) for a, b in runs_of]
            opened = [item for future in futures for item in future.result()]  # the first run's error first
        for item in opened:
            if isinstance(item, DicomFile):
                contents.dicom.append(item)
            else:
                _add_file(item, sniff(item), contents, budget)
    except zipfile.BadZipFile:
        raise UnsupportedMediaType("the zip archive is corrupt or truncated") from None
    except RuntimeError as e:  # zipfile's error for encrypted entries
        raise InvalidStudy("the zip archive has encrypted entries; send it unencrypted") from e


def _open_entries(
    archive: Path, entries: list[zipfile.ZipInfo], targets: list[Path], budget: UploadBudget
) -> list[DicomFile | Path]:
    """Each of ``entries``: a stored DICOM file where it lies in ``archive`` (its CRC-32 checked), anything else
    unpacked to its target; through this thread's own handles on the archive."""
    opened: list[DicomFile | Path] = []
    with zipfile.ZipFile(archive) as zf, open(archive, "rb") as raw:
        with mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            for entry, target in zip(entries, targets, strict=True):
                if entry.compress_type == zipfile.ZIP_STORED and not entry.flag_bits & _ENCRYPTED:
                    start = _checked_stored_entry(mapped, entry)
                    if _kind_of(mapped[start : start + min(entry.file_size, 352)]) == "dicom":
                        opened.append(DicomFile(archive, start, entry.file_size))
                        continue
                    _copy_stored(raw, start, entry.file_size, target, budget)
                else:
                    with zf.open(entry) as src, open(target, "wb") as dst:
                        # The sizes in the directory can lie: the bytes really unpacked are what is counted.
                        while chunk := src.read(_CHUNK):
                            budget.spend_bytes(len(chunk))
                            dst.write(chunk)
                opened.append(target)
    return opened


def _checked_stored_entry(mapped: mmap.mmap, entry: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) entry's bytes begin in the archive, once its local header, size and CRC-32
    (checked by ISA-L, not zlib) match the directory; ``zipfile.BadZipFile`` where they do not."""
    header = mapped[entry.header_offset : entry.header_offset + _LOCAL_HEADER]
    if len(header) < _LOCAL_HEADER or header[:4] != _ZIP_MAGICS[0] or entry.compress_size != entry.file_size:
        raise zipfile.BadZipFile
    name_length, extra_length = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    start = entry.header_offset + _LOCAL_HEADER + name_length + extra_length
    if start + entry.file_size > len(mapped):
        raise zipfile.BadZipFile
    with memoryview(mapped) as view, view[start : start + entry.file_size] as data:
        if isal_zlib.crc32(data) != entry.CRC:
            raise zipfile.BadZipFile
    return start


def _copy_stored(raw, start: int, size: int, target: Path, budget: UploadBudget) -> None:
    """A stored entry that is not DICOM (a NIfTI image) copied out by the kernel, not through Python by zipfile."""
    budget.spend_bytes(size)
    with open(target, "wb") as dst:
        _copy_range(raw, start, size, dst)


def _copy_range(source, start: int, size: int, target) -> None:
    """``size`` bytes of the open file ``source`` from ``start`` copied to the open file ``target`` by the kernel."""
    copied = 0
    while copied < size:
        sent = os.sendfile(target.fileno(), source.fileno(), start + copied, size - copied)
        if sent == 0:  # the archive ended early: it shrank since it was mapped
            raise zipfile.BadZipFile
        copied += sent


def _check_directory(archive: Path, budget: UploadBudget) -> None:
    """Refuse (413), before zipfile parses an archive's central directory, one that lists more entries than the
    budget has files left (directories included) or is larger than they could need: zipfile reads the directory
    whole and keeps an object of each entry (200,000 entries took 70 MiB and 7.8 s). The count the end record
    claims is checked, then the entries the directory really holds are counted, header by header, up to the limit.
    ``zipfile.BadZipFile`` for an archive whose end records or directory do not add up."""
    files_left = budget.max_files - budget.files
    too_many = PayloadTooLarge(f"the upload holds more than {budget.max_files} files, unpacked archives included")
    with open(archive, "rb") as f:
        end, entries, directory_size = _end_of_directory(f)
        if entries > files_left:
            raise too_many
        if directory_size > files_left * _DIRECTORY_BYTES_PER_FILE:
            raise PayloadTooLarge(f"the zip archive's directory is over {_DIRECTORY_BYTES_PER_FILE} bytes a file")
        # Where zipfile reads it: just before the end records (data prepended to the archive shifts its offsets).
        start = end - directory_size
        if start < 0:
            raise zipfile.BadZipFile
        f.seek(start)
        listed = 0
        while f.tell() < end:
            header = f.read(_DIRECTORY_ENTRY.size)
            if len(header) < _DIRECTORY_ENTRY.size or header[:4] != _DIRECTORY_MAGIC:
                raise zipfile.BadZipFile
            listed += 1
            if listed > files_left:
                raise too_many
            f.seek(sum(_DIRECTORY_ENTRY.unpack(header)[1:]), os.SEEK_CUR)


def _end_of_directory(f: BinaryIO) -> tuple[int, int, int]:
    """Of the open archive ``f``: where its central directory ends (where its end records begin), how many entries
    the records say it has, and its size in bytes; found as zipfile finds them, ``zipfile.BadZipFile`` where it
    would not. Reads the last 64 KiB and a few bytes at most."""
    size = f.seek(0, os.SEEK_END)
    tail_start = max(0, size - _END_RECORD.size - 0xFFFF)  # the record, and a comment of at most 64 KiB
    f.seek(tail_start)
    tail = f.read()
    if tail[-_END_RECORD.size : -_END_RECORD.size + 4] == _END_MAGIC and tail.endswith(b"\0\0"):
        at = len(tail) - _END_RECORD.size  # no comment: the common case, which zipfile tries first
    else:
        at = tail.rfind(_END_MAGIC)
    if at < 0 or len(tail) - at < _END_RECORD.size:
        raise zipfile.BadZipFile
    end = tail_start + at
    _, _, _, _, entries, directory_size, _, _ = _END_RECORD.unpack_from(tail, at)
    # A ZIP64 locator just before the end record: zipfile takes the counts and sizes of the ZIP64 record before it.
    locator_at = end - _ZIP64_LOCATOR.size
    record_at = locator_at - _ZIP64_END_RECORD.size
    if locator_at < 0:
        return end, entries, directory_size
    f.seek(locator_at)
    magic, disk, _, disks = _ZIP64_LOCATOR.unpack(f.read(_ZIP64_LOCATOR.size))
    if magic != _ZIP64_LOCATOR_MAGIC:
        return end, entries, directory_size
    if disk != 0 or disks > 1:  # an archive split over several disks, which zipfile does not read either
        raise zipfile.BadZipFile
    if record_at < 0:
        return end, entries, directory_size
    f.seek(record_at)
    magic, _, _, _, _, _, _, entries64, directory_size64, _ = _ZIP64_END_RECORD.unpack(f.read(_ZIP64_END_RECORD.size))
    if magic != _ZIP64_END_MAGIC:
        return end, entries, directory_size
    return record_at, entries64, directory_size64


def _check_entries(entries: list[zipfile.ZipInfo], budget: UploadBudget) -> None:
    """Refuse before unpacking anything what the archive's directory already shows to be too much."""
    if not entries:
        raise InvalidStudy("the zip archive is empty")
    for entry in entries:
        name = PurePosixPath(entry.filename.replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts or ":" in entry.filename:
            raise InvalidStudy("a zip entry's path leaves the archive (absolute, a drive, or '..'); refused")
    budget.spend_files(len(entries))
    declared = sum(e.file_size for e in entries)
    if budget.bytes + declared > budget.max_bytes:
        raise PayloadTooLarge(f"the upload unpacks to more than this server's limit of {budget.max_bytes} bytes")
