"""Every kind of bad upload gets a 4xx with a reason, and the server keeps serving."""

import http.client
import io

import numpy as np
import pydicom
import pytest

from conftest import TEST_MAX_VOXELS, zip_bytes, zip_files
from serve_app.studies.phantoms import ct_phantom
from serve_app.studies.sample_data import write_ct_series

SEGMENT = "/v1/models/ct-phantom-organ/segment"


def _dicom_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_series(tmp_path_factory):
    phantom = ct_phantom(np.random.default_rng(10_002), shape=(64, 64, 12), spacing=(5.4, 5.4, 8.0))
    return write_ct_series(phantom.volume, tmp_path_factory.mktemp("small"))


def _cases(series, tmp_path):
    files = {p.name: p.read_bytes() for p in series}
    other = write_ct_series(ct_phantom(np.random.default_rng(1), shape=(64, 64, 4)).volume, tmp_path / "other")

    no_pixels = pydicom.dcmread(series[3])
    del no_pixels.PixelData
    resized = pydicom.dcmread(series[5])
    resized.Rows, resized.Columns = 32, 32
    resized.PixelData = np.zeros((32, 32), np.int16).tobytes()
    too_big = ct_phantom(np.random.default_rng(2), shape=(128, 128, TEST_MAX_VOXELS // (128 * 128) + 1))
    too_big_series = write_ct_series(too_big.volume, tmp_path / "big")

    return {
        "not a zip": (SEGMENT, b"this is a text file, not a study", "application/zip", 415, "not a zip"),
        "empty body": (SEGMENT, b"", "application/zip", 422, "empty"),
        "empty zip": (SEGMENT, zip_bytes({}), "application/zip", 422, "zip archive is empty"),
        "corrupt zip": (SEGMENT, zip_files(series)[:5000], "application/zip", 415, "corrupt or truncated"),
        "zip of non-DICOM files": (SEGMENT, zip_bytes({"README.txt": b"hello", "a.csv": b"1,2"}), "application/zip", 422, "no DICOM"),
        "two series": (SEGMENT, zip_files(series + other), "application/zip", 422, "2 different series"),
        "missing pixel data": (SEGMENT, zip_bytes({**files, series[3].name: _dicom_bytes(no_pixels)}), "application/zip", 422, "no pixel data"),
        "inconsistent slice sizes": (SEGMENT, zip_bytes({**files, series[5].name: _dicom_bytes(resized)}), "application/zip", 422, "different sizes"),
        "zip entry escaping with ../": (SEGMENT, zip_bytes({"../../etc/evil.dcm": files[series[0].name]}), "application/zip", 422, "leaves the archive"),
        "DICOM cut inside its header": (SEGMENT, files[series[0].name][:400], "application/dicom", 422, "no pixel data"),
        "DICOM cut inside its pixel data": (SEGMENT, files[series[0].name][:-1000], "application/dicom", 422, "cannot be decoded"),
        "volume over the limit": (SEGMENT, zip_files(too_big_series), "application/zip", 413, "over this server's limit"),
        "unknown model": ("/v1/models/no-such-model/segment", zip_files(series), "application/zip", 404, "unknown model"),
    }


CASES = [
    "not a zip", "empty body", "empty zip", "corrupt zip", "zip of non-DICOM files", "two series",
    "missing pixel data", "inconsistent slice sizes", "zip entry escaping with ../",
    "DICOM cut inside its header", "DICOM cut inside its pixel data",
    "volume over the limit", "unknown model",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_upload_gets_a_4xx_with_a_reason_then_server_still_serves(client, small_series, tmp_path, case):
    path, body, content_type, status, reason = _cases(small_series, tmp_path)[case]
    response = client.post(path, content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]["reason"]

    good = client.post(SEGMENT, content=zip_files(small_series), headers={"content-type": "application/zip"})
    assert good.status_code == 200, good.text


def test_upload_over_the_byte_limit_is_refused_before_it_is_read(server_url, app_config):
    # A raw connection: the client declares 2 GiB and sends 16 bytes; the answer must not wait for the rest.
    host, port = server_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", SEGMENT)
    connection.putheader("Content-Type", "application/zip")
    connection.putheader("Content-Length", str(app_config.limits.max_upload_bytes + 1))
    connection.endheaders()
    connection.send(b"PK\x03\x04" + b"x" * 12)
    response = connection.getresponse()
    assert response.status == 413
    assert b"over this server's limit" in response.read()
    connection.close()


def test_multipart_without_a_file_part_is_refused(client):
    response = client.post(SEGMENT, files={"note": (None, "a form field, not a file")})
    assert response.status_code == 422
    assert "no file parts" in response.json()["error"]["reason"]
