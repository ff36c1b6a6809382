"""The JSON bodies of the PACS routes: a segmentation of a series the PACS holds, and a store-back's outcome."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from serve_app.strict_model import StrictModel

__all__ = ["PacsSegmentRequest", "StoreRequest", "Uid"]

# PS3.5 9.1: digits and dots, at most 64 characters.
Uid = Annotated[str, StringConstraints(pattern=r"^[0-9][0-9.]{0,63}$")]


class PacsSegmentRequest(StrictModel):
    """``POST /v1/models/{name}/segment`` with a JSON body: segment a series that a configured PACS holds."""

    pacs: str = Field(description="A PACS of the server's `pacs` config section, by name (never an address).")
    study_instance_uid: Uid = Field(description="The study's StudyInstanceUID.")
    series_instance_uid: Uid = Field(description="The series' SeriesInstanceUID.")
    store_results: bool | None = Field(
        None, description="Store the DICOM SEG and SR back to that PACS; null: the PACS's store_results setting."
    )


class StoreRequest(StrictModel):
    """``POST /v1/results/{id}/store``: store a result's DICOM SEG and SR to a PACS (again)."""

    pacs: str = Field(description="A PACS of the server's `pacs` config section, by name.")
