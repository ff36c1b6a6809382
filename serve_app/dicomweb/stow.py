"""medserve as a STOW-RS destination (PS3.18 10.5): a PACS pushes a study, the request's body is a
``multipart/related; type="application/dicom"`` stream of Part-10 instances.

``StowBody.receive`` streams the parts to files in the request's upload folder within its ``UploadBudget`` (a
segmentation's ``Receive``); ``StowBody.answer`` is the STOW-RS answer, a DICOM JSON dataset listing the instances
received.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pydicom

from serve_app.dicomweb.multipart import DicomPartFiles, multipart_related_boundary
from serve_app.errors import BadRequest, InvalidStudy, PayloadTooLarge, UnsupportedMediaType
from serve_app.studies.upload import UploadBudget, sniff

__all__ = ["DICOM_JSON", "StowBody", "StowedInstance"]

DICOM_JSON = "application/dicom+json"


@dataclass(frozen=True)
class StowedInstance:
    """One instance a STOW-RS request carried, as its answer lists it."""

    sop_class_uid: str
    sop_instance_uid: str


class StowBody:
    """A STOW-RS request's body on its way into a segmentation's upload folder.

    Args:
        content_type: the request's Content-Type.
        declared_bytes: its Content-Length, when it declares one.
        chunks: the body, as it arrives.
    """

    def __init__(self, content_type: str, declared_bytes: int | None, chunks: AsyncIterator[bytes]):
        self.content_type, self.declared_bytes, self.chunks = content_type, declared_bytes, chunks
        self.instances: list[StowedInstance] = []

    async def receive(self, folder: Path, budget: UploadBudget) -> int:
        """Write each part to a file of ``folder`` and note the instance it holds; return the bytes written.

        Raises ``UnsupportedMediaType`` (415) for a body that is not ``multipart/related`` of
        ``application/dicom`` parts, or a part that is not a DICOM Part-10 file; ``BadRequest`` (400) for a
        malformed or truncated multipart body; ``InvalidStudy`` (422) for one without parts or with an unreadable
        instance; ``PayloadTooLarge`` (413) over the budget.
        """
        boundary = multipart_related_boundary(self.content_type)
        if boundary is None:
            raise UnsupportedMediaType(
                'a STOW-RS body must be multipart/related; type="application/dicom" (Part-10 instances, one a part)'
            )
        if not boundary:
            raise BadRequest("the multipart/related content type has no boundary")
        if self.declared_bytes is not None and self.declared_bytes > budget.max_bytes:
            raise PayloadTooLarge(
                f"the upload is {self.declared_bytes} bytes, over this server's limit of {budget.max_bytes}"
            )
        paths = await DicomPartFiles(boundary, folder, budget).receive(self.chunks, "the multipart/related body")
        if not paths:
            raise InvalidStudy("the STOW-RS body has no parts")
        for number, path in enumerate(paths, start=1):
            if sniff(path) != "dicom":
                raise UnsupportedMediaType(f"part {number} of the STOW-RS body is not a DICOM Part-10 file")
        self.instances = await asyncio.to_thread(_stowed_instances, folder)
        return budget.bytes

    def answer(self, result_url: str | None) -> dict:
        """The STOW-RS answer as DICOM JSON: every instance under ReferencedSOPSequence (all were stored and
        segmented: a request that fails is answered with an error instead), RetrieveURL the result's (none when no
        route took a push that named no model)."""
        answer = pydicom.Dataset()
        if result_url is not None:
            answer.RetrieveURL = result_url
        answer.ReferencedSOPSequence = [_referenced(instance) for instance in self.instances]
        return answer.to_json_dict()


def _stowed_instances(folder: Path) -> list[StowedInstance]:
    """The SOP class and instance of each instance spooled into ``folder``, in part order."""
    instances = []
    for path in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            instances.append(StowedInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        except Exception:  # pydicom raises many types for a cut or corrupt file
            raise InvalidStudy("a part of the STOW-RS body is a truncated or unreadable DICOM file") from None
    return instances


def _referenced(instance: StowedInstance) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = instance.sop_class_uid
    item.ReferencedSOPInstanceUID = instance.sop_instance_uid
    return item
