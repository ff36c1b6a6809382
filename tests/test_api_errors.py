"""The API's contract on the live server: every JSON answer documented in /openapi.json, every error in
medserve's format with the right status (whoever raised it), one upload budget per request, and hang-ups
counted as 499."""

import http.client
import io
import time
import zipfile

import httpx
import pytest

from helpers import SEGMENT, requests_counted, settled_counts, wait_until_counted, zip_files

JSON_ROUTES = {
    ("/healthz", "get"): "Health",
    ("/readyz", "get"): "Readiness",
    ("/v1/models", "get"): "ModelList",
    ("/v1/models/{name}", "get"): "ModelSummary",
    ("/v1/models/{name}/segment", "post"): "SegmentResponse",
    ("/v1/results/{result_id}", "get"): "ResultSummary",
    ("/v1/results/{result_id}/store", "post"): "PacsStoreOutcome",
    ("/v1/results/{result_id}/reviews", "get"): "ReviewList",
    ("/v1/reviews", "get"): "ReviewList",
    ("/v1/deliveries", "get"): "DeliveryList",
    ("/v1/deliveries/{delivery_id}/resend", "post"): "Delivery",
}


@pytest.fixture(scope="module")
def openapi(server_url) -> dict:
    response = httpx.get(f"{server_url}/openapi.json", timeout=60)
    assert response.status_code == 200
    return response.json()


def test_openapi_names_every_field_of_the_segment_answer(openapi):
    segment = openapi["paths"]["/v1/models/{name}/segment"]["post"]["responses"]
    assert segment["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/SegmentResponse"}
    schemas = openapi["components"]["schemas"]
    fields = schemas["SegmentResponse"]["properties"]
    assert set(fields) == {
        "result_id",
        "model",
        "labels",
        "shape",
        "spacing",
        "orientation",
        "affine",
        "mask_url",
        "seg_url",
        "sr_url",
        "notes",
        "pacs_store",
        "batch_size",
        "uploaded_bytes",
        "timings_ms",
    }
    assert all(field.get("description") for field in fields.values()), fields
    assert set(schemas["LabelVolume"]["properties"]) == {"label", "name", "volume_ml"}
    timings = set(schemas["SegmentTimings"]["properties"])
    assert timings == {"upload", "preprocess", "model_queue", "model", "postprocess", "total"}


@pytest.mark.parametrize("route", [pytest.param(route, id=f"{route[1].upper()} {route[0]}") for route in JSON_ROUTES])
def test_openapi_gives_every_json_answer_its_model_and_errors_their_format(openapi, route):
    path, method = route
    responses = openapi["paths"][path][method]["responses"]
    schema = responses["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": f"#/components/schemas/{JSON_ROUTES[route]}"}
    for status, response in responses.items():
        # Every error is an ErrorResponse, but /readyz's 503, which is its Readiness ("not ready").
        if status.startswith("4") or (status.startswith("5") and path != "/readyz"):
            assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


def test_segment_answer_matches_its_documented_model(client, phantom_series):
    response = client.post(SEGMENT, content=zip_files(phantom_series[:8]), headers={"content-type": "application/zip"})
    assert response.status_code == 200, response.text
    from serve_app.segmentation.responses import SegmentResponse

    SegmentResponse.model_validate(response.json())  # every field there, of its type, and no other
    assert set(response.json()) == set(SegmentResponse.model_fields)


@pytest.mark.parametrize(
    "method, path, params, status, reason",
    [
        pytest.param("GET", "/no/such/route", {}, 404, "no such route", id="unknown route"),
        pytest.param("GET", SEGMENT, {}, 405, "not allowed", id="method not allowed"),
        pytest.param("DELETE", "/v1/models", {}, 405, "not allowed", id="DELETE on a GET route"),
        pytest.param("POST", SEGMENT, {"stat": "maybe"}, 400, "stat", id="query parameter of the wrong type"),
    ],
)
def test_errors_the_framework_raises_come_in_medserves_format(client, method, path, params, status, reason):
    response = client.request(method, path, params=params, content=b"x")
    assert response.status_code == status, response.text
    body = response.json()
    assert body.keys() == {"error"} and body["error"].keys() == {"status", "reason"}, body
    assert body["error"]["status"] == status and reason in body["error"]["reason"], body


def test_too_many_multipart_parts_is_a_413_in_medserves_format(client, app_config):
    parts = [
        ("files", (f"{n}.dcm", b"x", "application/dicom")) for n in range(app_config.limits.max_files_per_upload + 1)
    ]
    response = client.post(SEGMENT, files=parts)
    assert response.status_code == 413, response.text
    assert "file parts" in response.json()["error"]["reason"]


def _zip_of_zeros(size: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(size))
    return buffer.getvalue()


def test_the_unpacked_size_limit_bounds_the_whole_upload_not_each_archive(client, app_config):
    # Three small parts, each unpacking to 40 % of the limit: each archive is within it, the upload is not.
    limit = app_config.limits.max_upload_bytes
    part = _zip_of_zeros(int(limit * 0.4))
    assert len(part) * 3 < limit / 100
    files = [("files", (f"part{n}.zip", part, "application/zip")) for n in range(3)]
    response = client.post(SEGMENT, files=files)
    assert response.status_code == 413, response.text
    assert "unpack" in response.json()["error"]["reason"]
    assert list(app_config.storage.uploads.iterdir()) == []  # nothing of it left behind

    good = client.post(SEGMENT, files=[("files", ("part.zip", part, "application/zip"))])
    assert good.status_code == 422, good.text  # within the budget: unpacked, and found to hold no study


def test_a_client_that_hangs_up_is_counted_as_499_not_500(server_url):
    before_499, before_500 = settled_counts(499, 500)
    host, port = server_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", SEGMENT)
    connection.putheader("Content-Type", "application/zip")
    connection.putheader("Content-Length", "1000000")
    connection.endheaders()
    connection.send(b"PK\x03\x04" + bytes(1000))  # part of the body, then the client goes away
    time.sleep(2)
    connection.close()
    assert wait_until_counted(499, before_499 + 1) == before_499 + 1
    assert requests_counted(500) == before_500
