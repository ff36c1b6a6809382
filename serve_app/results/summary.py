"""A stored result as ``GET /v1/results/{id}`` reopens it."""

from __future__ import annotations

from pydantic import BaseModel, Field

from serve_app.model_spec import ModelRef
from serve_app.results.measurements import LabelVolume
from serve_app.results.reviews import Review

__all__ = ["ResultSummary"]


class ResultSummary(BaseModel):
    """A result as it is reopened: what it measured, where its files are, and its reviews."""

    result_id: str = Field(description="The result's id.")
    labels: list[LabelVolume] = Field(description="Each foreground label and its volume.")
    model: ModelRef | None = Field(None, description="The model that made it; null for a result stored without it.")
    mask_url: str = Field(description="Where to GET the mask (gzipped NIfTI, uint8 labels, on the study's grid).")
    image_url: str | None = Field(
        description="Where to GET the study's image on the mask's grid (gzipped NIfTI); null unless the segment "
        "request asked to keep it (keep_image=true)."
    )
    reviews: list[Review] = Field(description="Its reviews, oldest first.")
