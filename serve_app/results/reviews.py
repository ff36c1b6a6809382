"""Radiologists' reviews of results: accept, reject or comment, kept with the result they judge.

A review is one JSON file in its result's ``reviews/`` folder (written aside, renamed into place: two reviewers
never overwrite each other, and a reader never sees half a review). It lives as long as its result
(``storage.result_retention_hours``): export them as CSV (``GET /v1/reviews?format=csv``) to keep them longer.

A reviewer's name and comment are what a hospital's staff typed: they are stored and returned to the tenant that
wrote them, never logged, audited or put in a metric's label (a comment may name a patient).

Usage::

    store = ReviewStore(results)                       # results: the ResultStore
    review = store.add(result_id, tenant_id, ReviewRequest(verdict="accept", reviewer="Dr Who"))
    store.of_result(result_id, tenant_id)              # [review]
    reviews_csv(store.of_tenant(tenant_id, model="ct-phantom-organ"))
"""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.results.store import ResultStore

__all__ = [
    "MAX_COMMENT_CHARS",
    "MAX_REVIEWER_CHARS",
    "Review",
    "ReviewList",
    "ReviewRequest",
    "ReviewStore",
    "Verdict",
    "reviews_csv",
]

MAX_COMMENT_CHARS = 2000
MAX_REVIEWER_CHARS = 100
Verdict = Literal["accept", "reject", "comment"]
_REVIEWS_FOLDER = "reviews"
# A cell a spreadsheet would take for a formula: written with a leading ' (OWASP's CSV injection advice).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class ReviewRequest(BaseModel):
    """The body of ``POST /v1/results/{id}/reviews``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    verdict: Verdict = Field(description="accept or reject the result, or only comment on it.")
    reviewer: str = Field(
        min_length=1,
        max_length=MAX_REVIEWER_CHARS,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Who reviews, as typed (one line); the tenant is known from the API key.",
    )
    comment: str = Field("", max_length=MAX_COMMENT_CHARS, description="Free text; required with verdict comment.")

    @model_validator(mode="after")
    def _comment_has_text(self) -> ReviewRequest:
        if self.verdict == "comment" and not self.comment:
            raise ValueError("a review with verdict comment needs a comment")
        return self


class Review(BaseModel):
    """A stored review, as the API returns it."""

    review_id: str = Field(description="The review's id: 32 hex digits.")
    result_id: str = Field(description="The result it judges.")
    model: str | None = Field(description="The model that made the result; null for a result stored without it.")
    model_version: str | None = Field(description="That model's version when it made the result.")
    tenant: str = Field(description="The tenant whose API key wrote the review.")
    reviewer: str = Field(description="Who reviewed, as typed.")
    verdict: Verdict = Field(description="accept, reject or comment.")
    comment: str = Field(description="Free text; may be empty.")
    created_at: datetime = Field(description="When the review was stored (UTC).")


class ReviewList(BaseModel):
    reviews: list[Review] = Field(description="Oldest first.")


class ReviewStore:
    """Reviews kept in their results' folders of ``results``; a tenant sees only its own results' reviews."""

    def __init__(self, results: ResultStore):
        self.results = results

    def add(self, result_id: str, tenant_id: str, request: ReviewRequest) -> Review:
        """Store a review of the tenant's result ``result_id``; ``ResultNotFound`` (404) for another's or none."""
        spec = self.results.model_of(result_id, tenant_id)
        review = Review(
            review_id=uuid.uuid4().hex,
            result_id=result_id,
            model=spec.name if spec else None,
            model_version=spec.version if spec else None,
            tenant=tenant_id,
            reviewer=request.reviewer,
            verdict=request.verdict,
            comment=request.comment,
            created_at=datetime.now(UTC),
        )
        folder = self.results.folder_of(result_id, tenant_id) / _REVIEWS_FOLDER
        folder.mkdir(exist_ok=True)
        # Named by time first, so that a folder's listing is in the order they were written.
        path = folder / f"{review.created_at:%Y%m%dT%H%M%S%f}-{review.review_id}.json"
        partial = path.with_suffix(".partial")
        partial.write_text(review.model_dump_json())
        partial.rename(path)
        return review

    def of_result(self, result_id: str, tenant_id: str) -> list[Review]:
        """The reviews of the tenant's result, oldest first."""
        return _read(self.results.folder_of(result_id, tenant_id) / _REVIEWS_FOLDER)

    def of_tenant(self, tenant_id: str, model: str | None = None, version: str | None = None) -> list[Review]:
        """Every review of the tenant's unexpired results, of ``model`` (and ``version``) when given; oldest first.

        Scans the results' folders: a day's results on one server are thousands at most.
        """
        reviews = [
            review
            for folder in self.results.folders_of_tenant(tenant_id)
            for review in _read(folder / _REVIEWS_FOLDER)
            if (model is None or review.model == model) and (version is None or review.model_version == version)
        ]
        return sorted(reviews, key=lambda r: r.created_at)


def _read(folder) -> list[Review]:
    if not folder.is_dir():
        return []
    return [Review.model_validate_json(path.read_text()) for path in sorted(folder.glob("*.json"))]


def reviews_csv(reviews: list[Review]) -> str:
    """The reviews as CSV, one row each, with a header of ``Review``'s field names."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(Review.model_fields), lineterminator="\r\n")
    writer.writeheader()
    for review in reviews:
        row = review.model_dump(mode="json")
        writer.writerow({k: _no_formula(v) for k, v in row.items()})
    return out.getvalue()


def _no_formula(value):
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value
