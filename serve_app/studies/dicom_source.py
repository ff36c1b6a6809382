"""The DICOM instances a volume was read from, kept so that results can reference them (DICOM SEG, SR)."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.uid import DeflatedExplicitVRLittleEndian

__all__ = ["DicomSource", "SourceFrame", "header_bytes", "without_pixels"]

# What a result never needs of its source: the pixels themselves, and their encapsulation.
_DROPPED = ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths")
_DROPPED_TAGS = frozenset(tag_for_keyword(keyword) for keyword in _DROPPED)
_PIXEL_DATA_TAG = tag_for_keyword("PixelData")
_PIXEL_DATA_TAG_BYTES = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as a little-endian file writes it


@dataclass(frozen=True)
class SourceFrame:
    """Where one slice of a volume came from."""

    instance: int  # index into ``DicomSource.headers``
    frame: int | None = None  # 1-based frame number in a multi-frame instance; None for a single-frame one


@dataclass
class DicomSource:
    """The headers of the DICOM instances a ``Volume`` was read from, and the source frame of each of its slices:
    ``slices[k]`` is where the volume's slice ``array[:, :, k]`` came from.

    A series of single-frame images has one instance per slice; an enhanced multi-frame image is one
    instance whose frames are the slices, in whatever order the file stores them.

    The headers are kept as DICOM files without their pixel data (``header_bytes``), and parsed only when a result
    is built from them (``instances``): a 300-slice series' headers cost more to convert to datasets, pickle between
    replicas or write as DICOM JSON than its pixels cost to read.
    """

    headers: list[bytes]
    slices: list[SourceFrame]
    _parsed: list[pydicom.Dataset] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of_datasets(cls, datasets: list[pydicom.Dataset], slices: list[SourceFrame]) -> DicomSource:
        return cls(headers=[_encoded(without_pixels(ds)) for ds in datasets], slices=slices)

    @property
    def instances(self) -> list[pydicom.Dataset]:
        """The headers as pydicom datasets (pixel data absent), parsed on first use."""
        if self._parsed is None:
            self._parsed = [pydicom.dcmread(io.BytesIO(header), force=True) for header in self.headers]
        return self._parsed

    def save(self, path: Path) -> None:
        """Written as JSON: each header's DICOM bytes in base64, and each slice's source frame."""
        document = {
            "headers": [base64.b64encode(header).decode("ascii") for header in self.headers],
            "slices": [[s.instance, s.frame] for s in self.slices],
        }
        Path(path).write_text(json.dumps(document))

    @classmethod
    def load(cls, path: Path) -> DicomSource:
        document = json.loads(Path(path).read_text())
        return cls(
            headers=[base64.b64decode(header) for header in document["headers"]],
            slices=[SourceFrame(i, f) for i, f in document["slices"]],
        )

    def __getstate__(self) -> dict:
        # Between replicas the bytes travel, not the datasets parsed from them.
        return {"headers": self.headers, "slices": self.slices, "_parsed": None}


def header_bytes(ds: pydicom.FileDataset, stream: BinaryIO) -> bytes:
    """The DICOM file ``ds`` was read from (``stream``, still open), up to its pixel data: its header as the sender
    wrote it.

    A file that cannot simply be cut there (a deflated or big-endian stream, an extended offset table before the
    pixels, float pixels) is written anew from ``without_pixels(ds)`` instead.
    """
    element = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True) if _PIXEL_DATA_TAG in ds else None
    others = any(tag in ds for tag in _DROPPED_TAGS - {_PIXEL_DATA_TAG})
    deflated = getattr(ds, "file_meta", {}).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    if isinstance(element, RawDataElement) and not (others or deflated):
        start = element.value_tell - (8 if element.is_implicit_VR else 12)  # tag, (VR,) value length
        stream.seek(0)
        prefix = stream.read(start + len(_PIXEL_DATA_TAG_BYTES))
        if start > 0 and prefix[start:] == _PIXEL_DATA_TAG_BYTES:
            return prefix[:start]
    return _encoded(without_pixels(ds))


def without_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``ds``'s header, file meta included, without its pixel data.

    Elements pydicom has not decoded yet are copied as they are, undecoded; one whose value was left on disk
    (``defer_size``) is read now, as the copy no longer knows the file.
    """
    elements = {}
    for tag in ds.keys():
        if tag not in _DROPPED_TAGS:
            element = ds.get_item(tag, keep_deferred=True)
            deferred = isinstance(element, RawDataElement) and element.value is None and element.length
            elements[tag] = ds[tag] if deferred else element
    header = pydicom.Dataset(elements)
    header.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
    return header


def _encoded(ds: pydicom.Dataset) -> bytes:
    """``ds`` as a DICOM file, in its file meta's transfer syntax (explicit VR little endian when it names none)."""
    buffer = io.BytesIO()
    if "TransferSyntaxUID" in ds.file_meta:
        pydicom.dcmwrite(buffer, ds)
    else:
        pydicom.dcmwrite(buffer, ds, implicit_vr=False, little_endian=True)
    return buffer.getvalue()
