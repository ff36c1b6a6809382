"""What a result measured, in the form every result format (JSON answer, DICOM SR, FHIR) reports it."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["LabelVolume"]


class LabelVolume(BaseModel):
    """One foreground label of a segmentation and how much of the study it fills."""

    label: int = Field(description="The label's value in the mask.")
    name: str = Field(description="The label's name in the model's model.yaml.")
    volume_ml: float = Field(description="Volume of the label's voxels in millilitres (cm³), on the study's grid.")
