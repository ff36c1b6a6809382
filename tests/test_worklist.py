"""The review worklist: the index of each tenant's results (``ResultIndex``) and the pages built from it, on storage
without Ray; then the route on the live test server, open and with tenants (the page is in test_viewer_browser.py)."""

import json
import shutil
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest

from helpers import MODEL, SEGMENT, ZIP, auth, zip_files
from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.model_repository import ModelRepository
from serve_app.results import SUMMARY_FILE, ResultStore
from serve_app.results import worklist as worklist_module
from serve_app.results.reviews import ReviewRequest, ReviewStore
from serve_app.results.worklist import MAX_PAGE, Worklist, WorklistQuery, WorklistRow, build_worklist

SPEC = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get(MODEL)
CANDIDATE = SPEC.model_copy(update={"version": "2.0.0"})


def result_id(n: int) -> str:
    return f"{n:032x}"


def saved(store: ResultStore, n: int, tenant: str, spec=SPEC, made: datetime | None = None, rollout=None) -> str:
    """Result ``n`` of ``tenant`` made by ``spec``, committed with its ``rollout`` marker (``ResultRollout``'s
    fields) when given; made at ``made`` when given (else now)."""
    rid = result_id(n)
    summary = {"labels": [{"label": 1, "name": "organ", "volume_ml": float(n)}]}
    store.save(rid, np.ones((2, 2, 2), np.uint8), (0, 0, 0), (2, 2, 2), np.eye(4), summary, spec)
    if made is not None:
        path = store.root / f"{rid}.staged" / SUMMARY_FILE
        path.write_text(json.dumps({**json.loads(path.read_text()), "created": made.isoformat()}))
    store.commit(rid, tenant, None, rollout)  # as a rollout's segment request commits it, with its marker
    return rid


def page(store: ResultStore, tenant: str, **query):
    return build_worklist(store, ReviewStore(store), tenant, WorklistQuery(**query))


def listed(store: ResultStore, tenant: str, **query) -> list[str]:
    """Every row's result id, page after page."""
    ids, cursor = [], None
    while True:
        found = page(store, tenant, cursor=cursor, **query)
        ids += [row.result_id for row in found.rows]
        if found.next_cursor is None:
            return ids
        cursor = found.next_cursor


@pytest.fixture
def store(tmp_path) -> ResultStore:
    return ResultStore(tmp_path / "results", retention_hours=48)


def test_newest_first_across_days_paged_filtered_and_the_tenants_own(store):
    now = datetime.now(UTC)
    # Made over three days, out of order; st-marys's 1-6 (4 and 5 by version 2.0.0), city-general's 7-8.
    made = {1: 40, 2: 30, 3: 1, 4: 20, 5: 25, 6: 5, 7: 2, 8: 3}  # hours ago
    for n, hours in made.items():
        tenant = "city-general" if n >= 7 else "st-marys"
        saved(store, n, tenant, CANDIDATE if n in (4, 5) else SPEC, now - timedelta(hours=hours))
    newest_first = [result_id(n) for n in (3, 6, 4, 5, 2, 1)]

    assert listed(store, "st-marys", limit=1) == newest_first  # one a page, each once
    assert listed(store, "st-marys", limit=4) == newest_first
    first = page(store, "st-marys", limit=2)
    assert [r.result_id for r in first.rows] == newest_first[:2] and first.next_cursor
    assert first.rows[0].model.version == "1.0.0" and first.rows[0].labels[0].volume_ml == 3.0
    assert (first.rows[0].reviews, first.rows[0].verdict, first.rows[0].role) == (0, None, None)
    assert listed(store, "st-marys", model=MODEL, version="2.0.0") == [result_id(4), result_id(5)]
    assert listed(store, "st-marys", version="1.0.0") == [result_id(n) for n in (3, 6, 2, 1)]
    assert listed(store, "st-marys", model="another-model") == []
    # Another tenant never sees them; an unknown tenant sees nothing.
    assert listed(store, "city-general") == [result_id(7), result_id(8)]
    assert listed(store, "rural-clinic") == []


def test_a_reviewed_result_leaves_the_awaiting_list(store):
    first, second = saved(store, 1, "st-marys"), saved(store, 2, "st-marys")
    reviews = ReviewStore(store)
    reviews.add(second, "st-marys", ReviewRequest(verdict="comment", reviewer="Dr Grey", comment="look again"))
    reviews.add(second, "st-marys", ReviewRequest(verdict="reject", reviewer="Dr Grey"))
    assert listed(store, "st-marys") == [first]
    (row,) = page(store, "st-marys", state="reviewed").rows
    assert (row.result_id, row.reviews, row.verdict) == (second, 2, "reject")
    assert listed(store, "st-marys", state="all") == [second, first]
    # Another tenant's review of it is not possible, and its worklist stays empty.
    assert listed(store, "city-general", state="all") == []


def test_a_shadow_candidate_is_shown_beside_its_live_result(store):
    live = saved(store, 1, "st-marys", rollout={"role": "live", "version": "1.0.0", "paired_result_id": None})
    shadow = saved(
        store, 2, "st-marys", CANDIDATE, rollout={"role": "shadow", "version": "2.0.0", "paired_result_id": live}
    )
    plain = saved(store, 3, "st-marys")
    (row_plain, row_live) = page(store, "st-marys").rows
    assert (row_plain.result_id, row_plain.candidates) == (plain, [])
    assert (row_live.result_id, row_live.role) == (live, "live")
    ((candidate),) = row_live.candidates
    assert (candidate.result_id, candidate.role, candidate.model.version) == (shadow, "shadow", "2.0.0")
    # The candidate's version finds the live result it was made beside.
    assert listed(store, "st-marys", version="2.0.0") == [live]

    reviews = ReviewStore(store)
    reviews.add(live, "st-marys", ReviewRequest(verdict="accept", reviewer="Dr Grey"))
    assert listed(store, "st-marys") == [plain, live]  # awaiting while its candidate is
    reviews.add(shadow, "st-marys", ReviewRequest(verdict="reject", reviewer="Dr Grey"))
    assert listed(store, "st-marys") == [plain]
    assert listed(store, "st-marys", state="reviewed") == [live]
    # A shadow result whose live result is gone is listed by itself.
    shutil.rmtree(store.root / live)
    assert listed(store, "st-marys", state="all") == [plain, shadow]


def test_a_page_looks_at_a_bounded_number_of_results(store, monkeypatch):
    monkeypatch.setattr(worklist_module, "MAX_SCANNED", 5)
    wanted = saved(store, 1, "st-marys", CANDIDATE)
    for n in range(2, 14):
        saved(store, n, "st-marys")
    short = page(store, "st-marys", version="2.0.0")
    assert short.rows == [] and short.next_cursor  # five looked at, none matched: go on from there
    assert listed(store, "st-marys", version="2.0.0") == [wanted]
    assert len(page(store, "st-marys", limit=MAX_PAGE).rows) == 5


def test_expired_results_leave_the_index(store):
    now = datetime.now(UTC)
    old = saved(store, 1, "st-marys", made=now - timedelta(hours=49))
    kept = saved(store, 2, "st-marys", made=now - timedelta(hours=47))
    assert listed(store, "st-marys") == [kept]  # an expired result is not listed, swept or not
    store.sweep()
    assert not (store.root / old).exists()
    assert [e.result_id for e in store.index.newest_first("st-marys")] == [kept]


def test_results_from_before_the_index_are_indexed_in_the_background_and_a_page_says_so_meanwhile(store, tmp_path):
    import fcntl

    from serve_app.config import load_config
    from serve_app.retention import RetentionSweeper

    kept = saved(store, 2, "st-marys")
    assert page(store, "st-marys").index_complete  # a store that began empty indexed every result on commit
    # A storage root from before the index: a page never walks the results; it says the index is being built.
    shutil.rmtree(store.index.root)
    again = ResultStore(store.root, retention_hours=48)
    first = page(again, "st-marys")
    assert (first.rows, first.next_cursor, first.index_complete) == ([], None, False)
    # One process indexes at a time: while another holds the lock, this one leaves it to that one.
    lock = open(again.index.root / ".indexing.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    assert again.index_existing() is False and not page(again, "st-marys").index_complete
    lock.close()
    # The retention sweeper indexes them, in its thread from the ingress's start.
    RetentionSweeper(load_config(overrides={"storage.root": str(tmp_path)})).sweep()  # its results: tmp_path/results
    after = page(again, "st-marys")
    assert ([row.result_id for row in after.rows], after.index_complete) == ([kept], True)
    assert again.index_existing() is True and oct((again.index.root / ".indexed-all").stat().st_mode & 0o777) == "0o600"


def test_a_bad_query_is_refused_naming_the_field():
    for query, field in [({"limit": 0}, "limit"), ({"limit": MAX_PAGE + 1}, "limit"), ({"state": "maybe"}, "state"),
                         ({"cursor": "../x"}, "cursor"), ({"colour": "red"}, "colour")]:  # fmt: skip
        with pytest.raises(ValueError, match=field):
            WorklistQuery(**query)


# The route, on the live servers.


@pytest.fixture(scope="module")
def study_zip(phantom_series) -> bytes:
    return zip_files(phantom_series)


def test_the_worklist_route_lists_filters_pages_and_refuses_bad_queries(client, study_zip):
    made = []
    for _ in range(2):
        answer = client.post(SEGMENT, content=study_zip, headers=ZIP)
        assert answer.status_code == 200, answer.text
        made.append(answer.json()["result_id"])
    newest = client.get("/v1/reviews/worklist", params={"model": MODEL, "version": "1.0.0", "limit": 2})
    assert newest.status_code == 200, newest.text
    assert [row["result_id"] for row in newest.json()["rows"]] == made[::-1]
    Worklist.model_validate(newest.json())  # every field there, of its type, and no other
    assert set(newest.json()["rows"][0]) == set(WorklistRow.model_fields)
    first = client.get("/v1/reviews/worklist", params={"limit": 1}).json()
    assert [row["result_id"] for row in first["rows"]] == [made[1]]
    after = client.get("/v1/reviews/worklist", params={"limit": 1, "cursor": first["next_cursor"]})
    assert after.json()["rows"][0]["result_id"] == made[0]
    assert client.get("/v1/reviews/worklist", params={"model": "no-such-model"}).json()["rows"] == []

    review = {"verdict": "accept", "reviewer": "Dr Grey"}
    assert client.post(f"/v1/results/{made[1]}/reviews", json=review).status_code == 201
    awaiting = client.get("/v1/reviews/worklist", params={"limit": 1}).json()["rows"]
    assert [row["result_id"] for row in awaiting] == [made[0]]
    reviewed = client.get("/v1/reviews/worklist", params={"state": "reviewed", "limit": 1}).json()["rows"]
    assert (reviewed[0]["result_id"], reviewed[0]["verdict"]) == (made[1], "accept")

    for params, words in [
        ({"limit": 0}, "limit"),
        ({"limit": MAX_PAGE + 1}, "limit"),
        ({"state": "maybe"}, "state"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"colour": "red"}, "unknown query parameter"),
    ]:
        refused = client.get("/v1/reviews/worklist", params=params)
        assert refused.status_code == 400, refused.text
        assert words in refused.json()["error"]["reason"]
    assert client.get("/v1/reviews/worklist").status_code == 200  # and a good one still works

    documented = client.get("/openapi.json").json()["paths"]["/v1/reviews/worklist"]["get"]
    assert documented["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Worklist"
    }
    assert {p["name"] for p in documented["parameters"]} == set(WorklistQuery.model_fields)


def test_a_tenant_never_sees_anothers_worklist(tenant_url, tenant_keys, study_zip):
    mine, theirs = auth(tenant_keys["path-lab"]), auth(tenant_keys["rural-clinic"])
    with httpx.Client(base_url=tenant_url, timeout=300) as api:
        made = api.post(SEGMENT, content=study_zip, headers={**ZIP, **mine})
        assert made.status_code == 200, made.text
        result = made.json()["result_id"]
        assert result in {r["result_id"] for r in api.get("/v1/reviews/worklist", headers=mine).json()["rows"]}
        for state in ("awaiting", "reviewed", "all"):
            seen = api.get("/v1/reviews/worklist", params={"state": state, "limit": MAX_PAGE}, headers=theirs)
            assert seen.status_code == 200, seen.text
            assert result not in {r["result_id"] for r in seen.json()["rows"]}
        assert api.get("/v1/reviews/worklist").status_code == 401
