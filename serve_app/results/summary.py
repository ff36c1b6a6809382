"""A stored result as ``GET /v1/results/{id}`` reopens it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from serve_app.model_spec import ModelRef
from serve_app.results.measurements import LabelVolume
from serve_app.results.reviews import Review

__all__ = ["ResultRollout", "ResultSummary"]


class ResultRollout(BaseModel):
    """A result's part in a rollout of its model (docs/rollouts.md)."""

    role: Literal["live", "shadow", "canary"] = Field(
        description="live: the live version's answer while a rollout runs; shadow: the candidate's run beside a "
        "live answer, kept for review and never sent to a PACS; canary: the candidate's answer to a canary study."
    )
    version: str = Field(description="The version that made the result.")
    paired_result_id: str | None = Field(
        None, description="For a shadow result: the id of the live result made from the same study; else null."
    )


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
    rollout: ResultRollout | None = Field(
        None, description="Its part in a rollout of its model (live, shadow or canary); null outside one."
    )
