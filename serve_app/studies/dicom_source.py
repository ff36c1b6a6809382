"""The DICOM instances a volume was read from, kept so that results can reference them (DICOM SEG, SR)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement

__all__ = ["DicomSource", "SourceFrame"]

# What a result never needs of its source: the pixels themselves, and their encapsulation.
_DROPPED = ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths")
_DROPPED_TAGS = frozenset(tag_for_keyword(keyword) for keyword in _DROPPED)


@dataclass(frozen=True)
class SourceFrame:
    """Where one slice of a volume came from."""

    instance: int  # index into ``DicomSource.instances``
    frame: int | None = None  # 1-based frame number in a multi-frame instance; None for a single-frame one


@dataclass
class DicomSource:
    """The headers (pixel data dropped) of the DICOM instances a ``Volume`` was read from, and the source
    frame of each of its slices: ``slices[k]`` is where the volume's slice ``array[:, :, k]`` came from.

    A series of single-frame images has one instance per slice; an enhanced multi-frame image is one
    instance whose frames are the slices, in whatever order the file stores them.
    """

    instances: list[pydicom.Dataset]
    slices: list[SourceFrame]

    @classmethod
    def of_headers(cls, headers: list[pydicom.Dataset]) -> DicomSource:
        """Single-frame instances already in slice order: instance ``k`` is slice ``k``."""
        return cls(instances=[without_pixels(h) for h in headers], slices=[SourceFrame(k) for k in range(len(headers))])

    def save(self, path: Path) -> None:
        """Written as the DICOM JSON model (PS3.18 F.2), one object per instance."""
        document = {
            "instances": [ds.to_json_dict() for ds in self.instances],
            "slices": [[s.instance, s.frame] for s in self.slices],
        }
        Path(path).write_text(json.dumps(document))

    @classmethod
    def load(cls, path: Path) -> DicomSource:
        document = json.loads(Path(path).read_text())
        return cls(
            instances=[pydicom.Dataset.from_json(item) for item in document["instances"]],
            slices=[SourceFrame(i, f) for i, f in document["slices"]],
        )


def without_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``ds``'s header, file meta included, without its pixel data.

    Elements pydicom has not decoded yet are copied as they are, undecoded (decoding each of a 300-slice series'
    headers costs more than reading its pixels); one whose value was left on disk (``defer_size``) is read now,
    as the copy no longer knows the file.
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
