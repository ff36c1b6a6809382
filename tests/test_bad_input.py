"""Every kind of bad upload gets a 4xx with a reason, and the server keeps serving."""

import gzip
import http.client
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import zstandard

from helpers import SEGMENT, TEST_MAX_VOXELS, ZIP, zip_bytes, zip_files
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series


def _dicom_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_series(tmp_path_factory):
    phantom = ct_phantom(np.random.default_rng(10_002), shape=(64, 64, 12), spacing=(5.4, 5.4, 8.0))
    return write_ct_series(phantom.volume, tmp_path_factory.mktemp("small"))


class Uploads:
    """Builds bad uploads from one good small series (and a second, other series, made on demand)."""

    def __init__(self, series: list[Path], tmp_path: Path):
        self.series, self.tmp_path = series, tmp_path
        self.files = {p.name: p.read_bytes() for p in series}

    def series_zip(self) -> bytes:
        return zip_files(self.series)

    def with_slice(self, index: int, change) -> bytes:
        """The series zipped, slice ``index`` changed in place by ``change(dataset)``."""
        dataset = pydicom.dcmread(self.series[index])
        change(dataset)
        return zip_bytes({**self.files, self.series[index].name: _dicom_bytes(dataset)})

    def with_every_slice(self, change) -> bytes:
        datasets = [pydicom.dcmread(p) for p in self.series]
        for dataset in datasets:
            change(dataset)
        return zip_bytes({p.name: _dicom_bytes(d) for p, d in zip(self.series, datasets, strict=True)})

    def other_series(self, shape) -> list[Path]:
        folder = self.tmp_path / f"other-{'x'.join(map(str, shape))}"
        return write_ct_series(ct_phantom(np.random.default_rng(1), shape=shape).volume, folder)

    def nifti(self, array: np.ndarray, sform: np.ndarray) -> bytes:
        image = nib.Nifti1Image(array, None)
        image.set_sform(sform, code=2)  # set directly: nibabel would refuse to derive a qform from a singular one
        return image.to_bytes()


def _drop_pixels(ds) -> None:
    del ds.PixelData


def _shrink(ds) -> None:
    ds.Rows, ds.Columns = 32, 32
    ds.PixelData = np.zeros((32, 32), np.int16).tobytes()


def _as_rgb(ds) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()


def _zero_spacing(ds) -> None:
    ds.PixelSpacing = [0, 0]


def _collinear_orientation(ds) -> None:
    ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]


def _nan_voxels() -> np.ndarray:
    array = np.zeros((32, 32, 8), np.float32)
    array[3, 4, 5] = np.nan
    return array


ZERO_COLUMN = np.diag([1.0, 0.0, 1.0, 1.0])

# (route, body from Uploads, content type, status, a phrase of the reason)
CASES = [
    pytest.param(
        SEGMENT, lambda u: b"this is a text file, not a study", "application/zip", 415, "not a zip", id="not a zip"
    ),
    pytest.param(SEGMENT, lambda u: b"", "application/zip", 422, "empty", id="empty body"),
    pytest.param(SEGMENT, lambda u: zip_bytes({}), "application/zip", 422, "zip archive is empty", id="empty zip"),
    pytest.param(
        SEGMENT, lambda u: u.series_zip()[:5000], "application/zip", 415, "corrupt or truncated", id="corrupt zip"
    ),
    pytest.param(
        SEGMENT,
        lambda u: zip_bytes({"README.txt": b"hello", "a.csv": b"1,2"}),
        "application/zip",
        422,
        "no DICOM",
        id="zip of non-DICOM files",
    ),
    pytest.param(
        SEGMENT,
        lambda u: zip_files(u.series + u.other_series((64, 64, 4))),
        "application/zip",
        422,
        "2 different series",
        id="two series",
    ),
    pytest.param(
        SEGMENT,
        lambda u: u.with_slice(3, _drop_pixels),
        "application/zip",
        422,
        "no pixel data",
        id="missing pixel data",
    ),
    pytest.param(
        SEGMENT,
        lambda u: u.with_slice(5, _shrink),
        "application/zip",
        422,
        "different sizes",
        id="inconsistent slice sizes",
    ),
    pytest.param(
        SEGMENT,
        lambda u: zip_bytes({"../../etc/evil.dcm": u.files[u.series[0].name]}),
        "application/zip",
        422,
        "leaves the archive",
        id="zip entry escaping with ../",
    ),
    pytest.param(
        SEGMENT,
        lambda u: u.files[u.series[0].name][:400],
        "application/dicom",
        422,
        "no pixel data",
        id="DICOM cut inside its header",
    ),
    pytest.param(
        SEGMENT,
        lambda u: u.files[u.series[0].name][:-1000],
        "application/dicom",
        422,
        "cannot be decoded",
        id="DICOM cut inside its pixel data",
    ),
    pytest.param(
        SEGMENT,
        lambda u: zip_files(u.other_series((128, 128, TEST_MAX_VOXELS // (128 * 128) + 1))),
        "application/zip",
        413,
        "over this server's limit",
        id="volume over the limit",
    ),
    pytest.param(
        "/v1/models/no-such-model/segment",
        lambda u: u.series_zip(),
        "application/zip",
        404,
        "unknown model",
        id="unknown model",
    ),
    pytest.param(
        SEGMENT, lambda u: u.with_every_slice(_as_rgb), "application/zip", 422, "RGB", id="colour (RGB) DICOM"
    ),
    pytest.param(
        SEGMENT,
        lambda u: u.with_every_slice(_zero_spacing),
        "application/zip",
        422,
        "PixelSpacing",
        id="zero pixel spacing",
    ),
    pytest.param(
        SEGMENT,
        lambda u: u.with_every_slice(_collinear_orientation),
        "application/zip",
        422,
        "ImageOrientationPatient",
        id="collinear row and column directions",
    ),
    pytest.param(
        SEGMENT,
        lambda u: u.nifti(np.zeros((32, 32, 8), np.int16), ZERO_COLUMN),
        "application/octet-stream",
        422,
        "affine",
        id="NIfTI affine with a zero column",
    ),
    pytest.param(
        SEGMENT,
        lambda u: gzip.compress(u.nifti(np.zeros((8, 8, 8), np.int16), np.eye(4)))[:-64],
        "application/octet-stream",
        422,
        "gzipped NIfTI image is corrupt or cut short",
        id="a .nii.gz cut short",
    ),
    pytest.param(
        SEGMENT,
        lambda u: u.nifti(_nan_voxels(), np.eye(4)),
        "application/octet-stream",
        422,
        "not finite",
        id="NIfTI with NaN voxels",
    ),
]


@pytest.mark.parametrize("path, body, content_type, status, reason", CASES)
def test_bad_upload_gets_a_4xx_with_a_reason_then_server_still_serves(
    client, small_series, tmp_path, path, body, content_type, status, reason
):
    uploads = Uploads(small_series, tmp_path)
    response = client.post(path, content=body(uploads), headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]["reason"]

    good = client.post(SEGMENT, content=uploads.series_zip(), headers=ZIP)
    assert good.status_code == 200, good.text


def _answer_to_an_upload_begun(
    server_url: str, declared_bytes: int, sent: bytes, *, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """The status and body answering a zip upload that declares ``declared_bytes`` and sends only ``sent``, on a raw
    connection: the answer must not wait for the rest."""
    host, port = server_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.putrequest("POST", SEGMENT)
        for name, value in {"Content-Type": "application/zip", **(headers or {})}.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(declared_bytes))
        connection.endheaders()
        connection.send(sent)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_upload_over_the_byte_limit_is_refused_before_it_is_read(server_url, app_config):
    # The client declares one byte over the limit and sends 16.
    status, body = _answer_to_an_upload_begun(
        server_url, app_config.limits.max_upload_bytes + 1, b"PK\x03\x04" + b"x" * 12
    )
    assert status == 413
    assert b"over this server's limit" in body


def test_multipart_without_a_file_part_is_refused(client):
    response = client.post(SEGMENT, files={"note": (None, "a form field, not a file")})
    assert response.status_code == 422
    assert "no file parts" in response.json()["error"]["reason"]


def test_a_content_encoding_the_server_cannot_decode_is_a_415_listing_those_it_can(client):
    response = client.post(SEGMENT, content=b"\x00" * 64, headers={**ZIP, "content-encoding": "br"})
    assert response.status_code == 415
    assert "'br' is not supported" in response.json()["error"]["reason"]
    assert response.headers["accept-encoding"] == "gzip, zstd"


def test_a_body_that_is_not_what_its_content_encoding_says_is_a_400(client):
    cut = gzip.compress(b"n+1\x00" * 100_000)[:-100]
    for body in (b"plainly not gzip", cut):
        response = client.post(SEGMENT, content=body, headers={**ZIP, "content-encoding": "gzip"})
        assert response.status_code == 400, response.text
        assert "not valid gzip" in response.json()["error"]["reason"]


def test_a_compressed_body_that_decodes_past_the_upload_limit_is_refused_there(client, app_config):
    # 64 KiB sent, decoding to twice the limit: counted as it decodes, refused at the limit.
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x00" * (2 * app_config.limits.max_upload_bytes))
    assert len(bomb) < 64 * 1024
    response = client.post(SEGMENT, content=bomb, headers={**ZIP, "content-encoding": "zstd"})
    assert response.status_code == 413
    assert "over this server's limit" in response.json()["error"]["reason"]


def test_content_encoding_on_a_multipart_upload_is_a_415(client):
    files = {"file": ("ct.nii", b"\x00" * 400)}
    response = client.post(SEGMENT, files=files, headers={"content-encoding": "gzip"})
    assert response.status_code == 415
    assert "single-file bodies" in response.json()["error"]["reason"]


def test_a_request_that_turns_off_the_disconnect_watch_is_refused_before_its_body_is_read(server_url, app_config):
    # Serve honours `x-request-disconnect-disabled: ?1` from any client, and then hands the ingress's code (on a
    # thread of its own) the server's own receive: an upload too large to arrive at once hung. This one declares
    # the upload limit and sends 64 KiB.
    status, body = _answer_to_an_upload_begun(
        server_url,
        app_config.limits.max_upload_bytes,
        b"PK\x03\x04" + bytes(64 * 1024),
        headers={"X-Request-Disconnect-Disabled": "?1"},
    )
    assert status == 400
    assert b"x-request-disconnect-disabled header is not accepted" in body


def test_the_disconnect_watch_header_saying_no_is_served(client, phantom_series):
    response = client.post(
        SEGMENT, content=zip_files(phantom_series), headers={**ZIP, "x-request-disconnect-disabled": "?0"}
    )
    assert response.status_code == 200, response.text
