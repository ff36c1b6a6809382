"""What the viewer asks of the API, over real HTTP on the test cluster: the study's image kept with a result
(keep_image), reviews stored with it, listed, exported as CSV, audited and counted; every bad review refused; and
on the tenant application, another tenant's results' reviews and images not found."""

import csv
import gzip
import io
import time

import httpx
import nibabel as nib
import numpy as np
import pytest

from helpers import MODEL, SEGMENT, ZIP, audit_lines, auth, exported_total, load_mask, zip_files
from serve_app.results.reviews import MAX_COMMENT_CHARS


@pytest.fixture(scope="module")
def study_zip(phantom_series) -> bytes:
    return zip_files(phantom_series)


@pytest.fixture(scope="module")
def kept(server_url, study_zip) -> dict:
    """A segment answer for the phantom series, sent as the viewer sends it: keeping the image."""
    with httpx.Client(base_url=server_url, timeout=300) as client:
        response = client.post(f"{SEGMENT}?keep_image=true", content=study_zip, headers=ZIP)
    assert response.status_code == 200, response.text
    return response.json()


def nifti(response: httpx.Response) -> nib.Nifti1Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


def test_the_studys_image_is_kept_on_the_masks_grid(client, kept, phantom):
    result = f"/v1/results/{kept['result_id']}"
    summary = client.get(result).json()
    assert summary["image_url"] == f"{result}/image"
    assert summary["mask_url"] == kept["mask_url"]
    assert summary["model"] == kept["model"]
    assert summary["labels"] == kept["labels"]

    image = nifti(client.get(summary["image_url"]))
    mask = load_mask(client, kept)
    assert image.shape == mask.shape == tuple(kept["shape"])
    np.testing.assert_allclose(image.affine, mask.affine, atol=1e-4)
    assert image.get_data_dtype() == np.int16  # HU, whole numbers
    # The phantom's HU, as the series stores them (rounded to whole numbers).
    np.testing.assert_allclose(np.asanyarray(image.dataobj), phantom.volume.array, atol=0.501)


def test_without_keep_image_there_is_no_image_and_the_404_says_why(client, study_zip):
    made = client.post(SEGMENT, content=study_zip, headers=ZIP)
    assert made.status_code == 200, made.text
    result = f"/v1/results/{made.json()['result_id']}"
    assert client.get(result).json()["image_url"] is None
    missing = client.get(f"{result}/image")
    assert missing.status_code == 404
    assert "keep_image=true" in missing.json()["error"]["reason"]
    assert client.get(f"/v1/results/{'0' * 32}/image").json()["error"]["reason"] == "no such result, or it has expired"


def test_a_review_is_stored_listed_exported_and_counted(client, kept):
    result_id = kept["result_id"]
    accepted_before = exported_total("ray_medserve_reviews_total", model=MODEL, verdict="accept")
    review = {"verdict": "accept", "reviewer": "Dr Grey", "comment": "organ outline is right"}
    made = client.post(f"/v1/results/{result_id}/reviews", json=review)
    assert made.status_code == 201, made.text
    stored = made.json()
    assert {k: stored[k] for k in review} == review
    assert (stored["result_id"], stored["tenant"]) == (result_id, "anonymous")
    assert (stored["model"], stored["model_version"]) == (kept["model"]["name"], kept["model"]["version"])

    assert stored in client.get(f"/v1/results/{result_id}").json()["reviews"]  # shown when reopened
    assert client.get(f"/v1/results/{result_id}/reviews").json() == {"reviews": [stored]}
    assert stored in client.get("/v1/reviews", params={"model": MODEL}).json()["reviews"]
    assert client.get("/v1/reviews", params={"model": "no-such-model"}).json() == {"reviews": []}

    exported = client.get("/v1/reviews", params={"model": MODEL, "format": "csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    rows = [row for row in csv.DictReader(io.StringIO(exported.text)) if row["review_id"] == stored["review_id"]]
    assert len(rows) == 1
    assert (rows[0]["verdict"], rows[0]["reviewer"], rows[0]["comment"]) == ("accept", "Dr Grey", review["comment"])

    deadline = time.monotonic() + 60  # Ray exports metrics every 2 s on the test cluster
    while exported_total("ray_medserve_reviews_total", model=MODEL, verdict="accept") < accepted_before + 1:
        assert time.monotonic() < deadline, "the review was not counted"
        time.sleep(0.5)


def test_bad_reviews_get_a_clear_4xx_and_a_good_one_still_works(client, kept):
    reviews = f"/v1/results/{kept['result_id']}/reviews"
    unknown = client.post(f"/v1/results/{'0' * 32}/reviews", json={"verdict": "accept", "reviewer": "Dr Grey"})
    assert unknown.status_code == 404, unknown.text
    for body, status, words in [
        ({"verdict": "accept", "reviewer": "Dr Grey", "comment": "x" * (MAX_COMMENT_CHARS + 1)}, 422, "comment"),
        ({"verdict": "maybe", "reviewer": "Dr Grey"}, 422, "verdict"),
        ({"verdict": "comment", "reviewer": "Dr Grey"}, 422, "needs a comment"),
        ({"verdict": "accept"}, 422, "reviewer"),
    ]:
        refused = client.post(reviews, json=body)
        assert refused.status_code == status, refused.text
        assert words in refused.json()["error"]["reason"]
        assert "maybe" not in refused.json()["error"]["reason"]  # what was sent is not echoed
    garbled = client.post(reviews, content=b"{not json", headers={"content-type": "application/json"})
    assert garbled.status_code == 422, garbled.text
    assert client.get("/v1/reviews", params={"format": "xlsx"}).status_code == 400
    good = client.post(reviews, json={"verdict": "reject", "reviewer": "Dr Yang", "comment": "x" * MAX_COMMENT_CHARS})
    assert good.status_code == 201, good.text


def test_reviews_and_images_are_the_tenants_own_and_audited_without_free_text(
    tenant_url, tenant_keys, tenant_config, study_zip
):
    mine, theirs = auth(tenant_keys["st-marys"]), auth(tenant_keys["rural-clinic"])
    with httpx.Client(base_url=tenant_url, timeout=300) as client:
        made = client.post(f"{SEGMENT}?keep_image=true", content=study_zip, headers={**ZIP, **mine})
        assert made.status_code == 200, made.text
        result = f"/v1/results/{made.json()['result_id']}"
        review = {"verdict": "reject", "reviewer": "Dr Kovacs", "comment": "misses the lower pole"}
        stored = client.post(f"{result}/reviews", json=review, headers=mine)
        assert stored.status_code == 201, stored.text
        assert stored.json()["tenant"] == "st-marys"

        assert client.post(f"{result}/reviews", json=review, headers=theirs).status_code == 404
        for path in (f"{result}/reviews", f"{result}/image", result):
            assert client.get(path, headers=theirs).status_code == 404
            assert client.get(path).status_code == 401
        assert client.get(f"{result}/image", headers=mine).status_code == 200
        listed = client.get("/v1/reviews", headers=theirs).json()["reviews"]
        assert stored.json()["review_id"] not in {r["review_id"] for r in listed}
        assert stored.json() in client.get("/v1/reviews", headers=mine).json()["reviews"]

    lines = [line for line in audit_lines(tenant_config) if line["route"] == "review"]
    ours = [line for line in lines if line["request_id"] == made.json()["result_id"] and line["outcome"] == "ok"]
    assert len(ours) == 1
    assert (ours[0]["tenant"], ours[0]["verdict"], ours[0]["model"]) == ("st-marys", "reject", MODEL)
    refused = [line for line in lines if line["tenant"] == "rural-clinic"]
    assert refused and all(line["status"] == 404 for line in refused)
    text = "\n".join(str(line) for line in audit_lines(tenant_config))
    assert "Kovacs" not in text and "lower pole" not in text


def test_openapi_documents_the_review_body_and_answer(client):
    post = client.get("/openapi.json").json()["paths"]["/v1/results/{result_id}/reviews"]["post"]
    assert post["responses"]["201"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Review"}
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["verdict"]["enum"] == ["accept", "reject", "comment"]
    assert body["properties"]["comment"]["maxLength"] == MAX_COMMENT_CHARS
