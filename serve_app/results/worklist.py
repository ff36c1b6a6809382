"""The review worklist: a tenant's results awaiting review (or reviewed, or all), newest first, one page at a time,
each live result with the shadow candidates' results of the same study beside it.

A page is read from the tenant's ``ResultIndex`` newest first from the cursor, looking at no more than
``MAX_SCANNED`` entries (one small read each, and a look into a matching result's folder): a request costs
O(days of retention + ``MAX_SCANNED`` + ``limit`` x candidates) file reads and holds one day's entry names, however
many results the tenant has. A page may so come back short with a ``next_cursor`` (the filters matched little of
what was looked at): the next page goes on from there. ``next_cursor`` is null once the oldest result was looked at.

Results stored before the index existed (by an earlier medserve) are indexed in the background, by each ingress
replica's retention sweeper from its start (``ResultStore.index_existing``), never in a request: until that is done
a page says ``index_complete: false``, and such older results may be missing from it.

Usage::

    page = build_worklist(results, reviews, tenant_id, WorklistQuery(model="ct-phantom-organ", state="awaiting"))
    page.rows[0].result_id, page.rows[0].candidates, page.next_cursor
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import ResultNotFound
from serve_app.model_spec import ModelRef
from serve_app.results.index import CURSOR_PATTERN, IndexEntry, RolloutRole
from serve_app.results.measurements import LabelVolume
from serve_app.results.reviews import ReviewStore, Verdict
from serve_app.results.store import ResultStore

__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "MAX_SCANNED",
    "Worklist",
    "WorklistItem",
    "WorklistQuery",
    "WorklistRow",
    "WorklistState",
    "build_worklist",
]

WorklistState = Literal["awaiting", "reviewed", "all"]
DEFAULT_PAGE = 25
MAX_PAGE = 100
# Index entries one page looks at, at most: what bounds a request's time when the filters match little.
MAX_SCANNED = 2000


class WorklistQuery(BaseModel):
    """What a worklist page is asked for (``GET /v1/reviews/worklist``'s query)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(None, max_length=200, description="Only this model's results.")
    version: str | None = Field(
        None, max_length=100, description="Only results of this version of it (or with a shadow candidate of it)."
    )
    state: WorklistState = Field(
        "awaiting",
        description="awaiting: results with no review yet (a live result is awaiting while it or a shadow candidate "
        "beside it is); reviewed: the others; all: both.",
    )
    limit: int = Field(DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="Rows in a page, at most.")
    cursor: str | None = Field(
        None, pattern=CURSOR_PATTERN, description="The next_cursor of the page before: this page starts after it."
    )


class WorklistItem(BaseModel):
    """One result in the worklist."""

    model_config = ConfigDict(extra="forbid")

    result_id: str = Field(description="The result's id: GET /v1/results/{id} opens it.")
    created_at: datetime = Field(description="When it was made (UTC).")
    model: ModelRef | None = Field(description="The model version that made it; null for a result stored without it.")
    role: RolloutRole | None = Field(description="Its part in a rollout of the model (live, shadow or canary); null "
                                     "outside one.")  # fmt: skip
    labels: list[LabelVolume] = Field(description="Each foreground label and its volume.")
    reviews: int = Field(description="How many reviews it has.")
    verdict: Verdict | None = Field(description="Its latest review's verdict; null before any.")


class WorklistRow(WorklistItem):
    """A result and, beside it, the shadow candidates' results of the same study."""

    candidates: list[WorklistItem] = Field(
        description="Results of the same study by a shadow candidate version, oldest first; empty outside a rollout."
    )


class Worklist(BaseModel):
    """A page of the worklist, newest first."""

    model_config = ConfigDict(extra="forbid")

    rows: list[WorklistRow] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        description="Pass as cursor for the next page; null once the tenant's oldest result was looked at."
    )
    index_complete: bool = Field(
        description="False while the results stored before the worklist's index existed (by an earlier medserve) "
        "are still being indexed, in the background: until then such older results may be missing from the pages."
    )


def build_worklist(results: ResultStore, reviews: ReviewStore, tenant_id: str, query: WorklistQuery) -> Worklist:
    """A page of the tenant's worklist (see the module's docstring for what it costs)."""
    complete = results.index_complete  # before any entry is read: "true" only for a page read from a complete index
    rows: list[WorklistRow] = []
    scanned = 0
    for entry in results.index.newest_first(tenant_id, before=query.cursor):
        scanned += 1
        if query.model is not None and entry.model != query.model:
            pass
        elif entry.role == "shadow" and entry.paired_result_id and _exists(results, entry.paired_result_id, tenant_id):
            pass  # shown beside its live result
        elif (row := _row(results, reviews, tenant_id, entry, query)) is not None:
            rows.append(row)
            if len(rows) == query.limit:
                return Worklist(rows=rows, next_cursor=entry.key, index_complete=complete)
        if scanned >= MAX_SCANNED:
            return Worklist(rows=rows, next_cursor=entry.key, index_complete=complete)
    return Worklist(rows=rows, next_cursor=None, index_complete=complete)


def _row(
    results: ResultStore, reviews: ReviewStore, tenant_id: str, entry: IndexEntry, query: WorklistQuery
) -> WorklistRow | None:
    """The entry's row if its result is still there and it fits the query's version and state; else None."""
    candidates = results.index.candidates_of(tenant_id, entry.result_id)
    if query.version is not None and query.version not in {entry.version, *(c.version for c in candidates)}:
        return None
    try:
        item = _item(results, reviews, tenant_id, entry)
    except ResultNotFound:  # expired or deleted since it was indexed
        return None
    beside = []
    for candidate in candidates:
        try:
            beside.append(_item(results, reviews, tenant_id, candidate))
        except ResultNotFound:
            continue
    awaiting = any(i.reviews == 0 for i in (item, *beside))
    if (query.state == "awaiting" and not awaiting) or (query.state == "reviewed" and awaiting):
        return None
    return WorklistRow(**item.model_dump(), candidates=beside)


def _item(results: ResultStore, reviews: ReviewStore, tenant_id: str, entry: IndexEntry) -> WorklistItem:
    summary = results.summary(entry.result_id, tenant_id)  # ResultNotFound for one gone
    made = reviews.of_result(entry.result_id, tenant_id)
    return WorklistItem(
        result_id=entry.result_id,
        created_at=entry.created_at,
        model=ModelRef(name=entry.model, version=entry.version) if entry.model and entry.version else None,
        role=entry.role,
        labels=summary.get("labels", []),
        reviews=len(made),
        verdict=made[-1].verdict if made else None,
    )


def _exists(results: ResultStore, result_id: str, tenant_id: str) -> bool:
    try:
        results.folder_of(result_id, tenant_id)
    except ResultNotFound:
        return False
    return True
