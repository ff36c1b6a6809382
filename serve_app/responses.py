"""The JSON answers of the HTTP API, as pydantic models: the ingress's routes declare them as their
``response_model``, so ``/docs`` and ``/openapi.json`` document every field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from serve_app.model_repository import ModelSpec, RefusedModel

__all__ = [
    "ERROR_RESPONSES",
    "ErrorDetail",
    "ErrorResponse",
    "Health",
    "ModelList",
    "ModelSummary",
    "ModelVersionSummary",
    "Readiness",
]


class ErrorDetail(BaseModel):
    status: int = Field(description="The HTTP status code, repeated.")
    reason: str = Field(description="What was wrong, in words; never what was sent (no file names or patient data).")


class ErrorResponse(BaseModel):
    """Every error medserve answers, whatever raised it."""

    error: ErrorDetail


# For a route's ``responses=``: the error statuses a client should expect, all in one format.
ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Malformed request: a query parameter of the wrong type, a broken multipart body.",
        401: "No API key, or a key that is not valid (with tenants configured).",
        403: "The tenant may not use this model, or may not send STAT requests.",
        404: "Unknown model, route, result or WSI job (another tenant's are not found either); a series the PACS "
        "does not have; a result's image that was not kept.",
        409: "A WSI job into an output folder that a running job of the tenant writes.",
        413: "Upload, unpacked upload, file count or volume over the server's or the tenant's limits.",
        415: "A file that is not a zip, a DICOM Part-10 file or NIfTI; a corrupt zip; a transfer syntax no decoder "
        "reads; a STOW-RS body that is not multipart/related of application/dicom.",
        422: "Readable, but not one usable image series; a model of the wrong task; a JSON body that does not fit "
        "its schema (a review's unknown verdict, an over-long comment) or names a PACS this server does not have "
        "(see the README's error table).",
        429: "Over the tenant's rate or concurrency quota; retry after Retry-After seconds.",
        502: "A configured PACS answered with an error or with something that is not DICOMweb; see Retry-After.",
        503: "Every replica of a stage is busy and its queue full, or a configured PACS cannot be reached or did not "
        "answer in time; retry after Retry-After seconds.",
        504: "The request took longer than its deadline (limits.request_deadline_s or its tenant's); its work was "
        "cancelled.",
    }.items()
}


class Health(BaseModel):
    status: Literal["ok"] = Field(description="Always ok: the ingress answers.")


class Readiness(BaseModel):
    status: Literal["ready", "not ready"] = Field(description="ready when every deployment answers.")
    models: list[str] = Field(default=[], description="The models served, when ready.")


class ModelVersionSummary(BaseModel):
    """One version of a model, as /v1/models/{name}/versions/{version}/segment reaches it."""

    version: str = Field(description="The version, from its model.yaml or its MONAI bundle's metadata.json.")
    source: str = Field(description="What it was read from: model.yaml or monai-bundle.")
    description: str = Field(description="Free text from its model.yaml or bundle metadata.")
    labels: dict[str, str] = Field(description="Label value (as a string) -> name; 0 is background.")

    @classmethod
    def of(cls, spec: ModelSpec) -> ModelVersionSummary:
        labels = {str(k): label.name for k, label in sorted(spec.labels.items())}
        return cls(version=spec.version, source=spec.source, description=spec.description, labels=labels)


class ModelSummary(BaseModel):
    """A model: its newest version's fields, and every version served."""

    name: str = Field(description="The model's name, as used in /v1/models/{name}/segment.")
    version: str = Field(description="The newest version: the one /v1/models/{name}/segment runs.")
    source: str = Field(description="What the newest version was read from: model.yaml or monai-bundle.")
    task: str = Field(description="What the model does: segmentation or tile_classification.")
    modality: str = Field(description="The DICOM modality the model takes (CT, MR); another gets a 422.")
    description: str = Field(description="Free text from the newest version's model.yaml or bundle metadata.")
    labels: dict[str, str] = Field(description="The newest version's labels: value (as a string) -> name.")
    versions: list[ModelVersionSummary] = Field(description="Every version served, newest first.")

    @classmethod
    def of(cls, versions: list[ModelSpec]) -> ModelSummary:
        """``versions``: the model's, newest first."""
        newest = ModelVersionSummary.of(versions[0])
        return cls(
            name=versions[0].name,
            task=versions[0].task,
            modality=versions[0].modality,
            **newest.model_dump(),
            versions=[ModelVersionSummary.of(spec) for spec in versions],
        )


class ModelList(BaseModel):
    models: list[ModelSummary] = Field(description="Every model this server runs.")
    refused: list[RefusedModel] = Field(
        description="Models of the repository that are not served, each with the file and field at fault."
    )
