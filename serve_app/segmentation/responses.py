"""The answer of a segment request (``POST /v1/models/{name}/segment`` and its DICOMweb forms)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from serve_app.model_spec import ModelRef
from serve_app.results.measurements import LabelVolume
from serve_app.segmentation.messages import StageTimings

__all__ = ["NIFTI_ONLY_NOTE", "PacsStoreOutcome", "SegmentResponse", "SegmentTimings"]


class PacsStoreOutcome(BaseModel):
    """What became of storing a result's DICOM SEG and SR to a PACS."""

    pacs: str = Field(description="The PACS, by name.")
    stored: bool = Field(description="Whether the PACS took both objects.")
    attempts: int = Field(
        description="Tries it took; a store-back is retried while the PACS is down or busy. 0 when it failed."
    )
    sop_instance_uids: list[str] = Field(description="The SOPInstanceUIDs of the SEG and the SR sent.")
    reason: str | None = Field(
        None, description="Why the store failed, when it did; the result stays downloadable from medserve."
    )


NIFTI_ONLY_NOTE = (
    "the study was NIfTI: its result is NIfTI only (a DICOM SEG and SR reference their source instances, and "
    "a NIfTI image has none)"
)


class SegmentTimings(BaseModel):
    """Milliseconds the request spent in each stage, as the ingress saw it."""

    upload: float = Field(description="Receiving the study: the upload spooled to storage, or the PACS retrieval.")
    preprocess: float = Field(description="Reading the study and the model's preprocessing.")
    model_queue: float = Field(description="Waiting for a model batch to fill, and transfers.")
    model: float = Field(description="The model batch's compute.")
    postprocess: float = Field(description="Mask onto the study's grid, components, volumes, storing the result.")
    total: float = Field(description="The whole request, from its first byte to the answer.")

    @classmethod
    def of(cls, upload_s: float, stages: StageTimings, total_s: float) -> SegmentTimings:
        seconds = {"upload": upload_s, **stages.model_dump(), "total": total_s}
        return cls(**{stage: round(s * 1000, 1) for stage, s in seconds.items()})


class SegmentResponse(BaseModel):
    """A finished segmentation: labels and volumes now, the mask at ``mask_url``."""

    result_id: str = Field(description="The result's id: 32 hex digits; also the audit line's request_id.")
    model: ModelRef = Field(description="The model that made it.")
    labels: list[LabelVolume] = Field(description="Each foreground label and its volume.")
    shape: list[int] = Field(description="The mask's shape: the study's voxel grid (I, J, K).")
    spacing: list[float] = Field(description="Voxel spacing along I, J, K in mm.")
    orientation: str = Field(description="Axis codes of I, J, K (nibabel's aff2axcodes), e.g. LPS for axial DICOM.")
    affine: list[list[float]] = Field(description="4x4: the study's voxel index -> RAS mm, as NIfTI's.")
    mask_url: str = Field(description="Where to GET the mask (gzipped NIfTI, uint8 labels, on the study's grid).")
    seg_url: str | None = Field(
        description="Where to GET the mask as a DICOM Segmentation on the source series' frames; null for NIfTI."
    )
    sr_url: str | None = Field(
        description="Where to GET the volumes as a DICOM Structured Report (TID 1500); null for NIfTI."
    )
    notes: list[str] = Field(description="What a client should know about this result, in words.")
    pacs_store: PacsStoreOutcome | None = Field(
        None, description="Whether the SEG and SR were stored back to the PACS, when the request asked for it."
    )
    batch_size: int = Field(description="Studies in the model batch that computed this one.")
    uploaded_bytes: int = Field(description="Bytes received.")
    timings_ms: SegmentTimings = Field(description="Milliseconds per stage.")
