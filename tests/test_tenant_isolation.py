"""One tenant's results and WSI jobs are invisible to every other tenant.

Each route that names a result or a job, asked with another tenant's key, answers exactly as it answers for an id
that does not exist: the same status and the same body (the id itself aside), so that not even a result's
existence is revealed. The owner's own key gets the thing, so each comparison is one that could fail.
"""

from __future__ import annotations

import time
import uuid

import httpx
import numpy as np
import pytest

from helpers import SEGMENT, ZIP, auth, wait_for_job, zip_files
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series
from serve_app.samples.synthetic_slides import write_slide

# An owner whose job list no other test counts exactly (test_wsi_jobs counts st-marys's).
OWNER = "path-lab"
# Another tenant that may use every result route; research-lab's requests take nothing of the quotas the tenant
# tests count (city-general's rate, rural-clinic's slots).
OTHER = "research-lab"
TILE_MODEL = "he-tile-tumour"
JOBS = "/v1/wsi/jobs"


@pytest.fixture
def owner_result(tenant_url, tenant_keys, tmp_path_factory) -> str:
    """A result of a DICOM study (so it has a SEG and an SR), kept with its image, owned by ``OWNER``."""
    phantom = ct_phantom(np.random.default_rng(10_077), shape=(64, 64, 16))
    series = write_ct_series(phantom.volume, tmp_path_factory.mktemp("isolation-series"))
    with httpx.Client(base_url=tenant_url, headers=auth(tenant_keys[OWNER]), timeout=300) as owner:
        made = owner.post(SEGMENT, params={"keep_image": "true"}, content=zip_files(series), headers=ZIP)
    assert made.status_code == 200, made.text
    return made.json()["result_id"]


@pytest.fixture
def owner_job(tenant_url, tenant_keys, tmp_path_factory) -> str:
    """A finished WSI job of ``OWNER``'s, on a slide it uploaded."""
    path = tmp_path_factory.mktemp("isolation-slide") / "slide.tiff"
    write_slide(path, 1024, 768, seed=11, tumour_fraction=0.5)
    with httpx.Client(base_url=tenant_url, headers=auth(tenant_keys[OWNER]), timeout=300) as owner:
        uploaded = owner.post("/v1/wsi/slides", params={"name": "slide.tiff"}, content=path.read_bytes())
        assert uploaded.status_code == 201, uploaded.text
        body = {"model": TILE_MODEL, "slides": [uploaded.json()["slide"]], "out": f"isolation-{uuid.uuid4().hex[:8]}"}
        deadline = time.monotonic() + 120
        while (submitted := owner.post(JOBS, json=body)).status_code == 429 and time.monotonic() < deadline:
            time.sleep(1)  # the tenant runs one job at a time: another test's may still be running
        assert submitted.status_code == 202, submitted.text
        job = wait_for_job(owner, submitted.json()["job_id"])
    assert job["state"] == "done", job
    return job["job_id"]


def _answer(client: httpx.Client, method: str, path: str, the_id: str, **kwargs) -> tuple[int, str]:
    """The status and body of ``method path`` for ``the_id``, the id replaced in the body so that two ids' answers
    compare."""
    response = client.request(method, path.format(id=the_id), **kwargs)
    return response.status_code, response.text.replace(the_id, "<id>")


RESULT_ROUTES = [
    ("GET", "/v1/results/{id}", {}),
    ("GET", "/v1/results/{id}/mask.nii.gz", {}),
    ("GET", "/v1/results/{id}/image", {}),
    ("GET", "/v1/results/{id}/seg.dcm", {}),
    ("GET", "/v1/results/{id}/sr.dcm", {}),
    ("GET", "/v1/results/{id}/fhir", {}),
    ("GET", "/v1/results/{id}/reviews", {}),
    ("POST", "/v1/results/{id}/reviews", {"json": {"verdict": "accept", "reviewer": "dr-other"}}),
    ("POST", "/v1/results/{id}/store", {"json": {"pacs": "unanswered"}}),
]
JOB_ROUTES = [
    ("GET", JOBS + "/{id}", {}),
    ("GET", JOBS + "/{id}/slides/0/summary.json", {}),
    ("GET", JOBS + "/{id}/slides/0/overlay.png", {}),
    ("GET", JOBS + "/{id}/slides/0/tiles.geojson", {}),
    ("DELETE", JOBS + "/{id}", {}),  # last: it would cancel the job, were it allowed
]


def _compared(tenant_url, tenant_keys, routes, owned_id: str, statuses: tuple[int, ...]) -> list:
    """Each of ``routes`` asked by ``OTHER`` for ``owned_id`` and for an unknown id: the routes whose answers differ,
    or are not one of ``statuses``. The owner's GETs of ``owned_id`` must succeed, so that each comparison is one
    that could fail."""
    differing = []
    with (
        httpx.Client(base_url=tenant_url, headers=auth(tenant_keys[OTHER]), timeout=60) as other,
        httpx.Client(base_url=tenant_url, headers=auth(tenant_keys[OWNER]), timeout=60) as owner,
    ):
        for method, path, kwargs in routes:
            theirs = _answer(other, method, path, owned_id, **kwargs)
            unknown = _answer(other, method, path, uuid.uuid4().hex, **kwargs)
            if theirs[0] not in statuses or theirs != unknown:
                differing.append((method, path, theirs, unknown))
            if method == "GET":
                assert owner.get(path.format(id=owned_id)).status_code == 200, path
    return differing


def test_another_tenants_result_is_answered_as_an_unknown_one(tenant_url, tenant_keys, owner_result):
    assert _compared(tenant_url, tenant_keys, RESULT_ROUTES, owner_result, (404,)) == []
    # The store names a PACS both tenants may use, on which nothing answers: the owner's store gets as far as the
    # PACS (503), so the other's 404 is the result's refusal, not the PACS's.
    with httpx.Client(base_url=tenant_url, headers=auth(tenant_keys[OWNER]), timeout=60) as owner:
        stored = owner.post(f"/v1/results/{owner_result}/store", json={"pacs": "unanswered"})
    assert stored.status_code == 503 and "unanswered" in stored.json()["error"]["reason"], stored.text


def test_another_tenants_wsi_job_is_answered_as_an_unknown_one(tenant_url, tenant_keys, owner_job):
    assert _compared(tenant_url, tenant_keys, JOB_ROUTES, owner_job, (404,)) == []
    with (
        httpx.Client(base_url=tenant_url, headers=auth(tenant_keys[OTHER]), timeout=60) as other,
        httpx.Client(base_url=tenant_url, headers=auth(tenant_keys[OWNER]), timeout=60) as owner,
    ):
        assert owner_job not in {job["job_id"] for job in other.get(JOBS).json()["jobs"]}
        assert owner.get(f"{JOBS}/{owner_job}").json()["state"] == "done"  # not cancelled by the other's DELETE
