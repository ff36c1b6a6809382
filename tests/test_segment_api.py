"""The HTTP API on a real Ray cluster with real Serve deployments."""

import gzip
import io
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
import zstandard
from pydicom.data import get_testdata_file

from helpers import SEGMENT, ZIP, dice, load_mask, zip_files


def test_phantom_series_zip_is_segmented_on_its_own_grid(client, phantom, phantom_series):
    response = client.post(SEGMENT, content=zip_files(phantom_series), headers=ZIP)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model"] == {"name": "ct-phantom-organ", "version": "1.0.0"}
    assert result["shape"] == list(phantom.volume.shape)
    assert result["spacing"] == pytest.approx(phantom.volume.spacing)
    assert result["orientation"] == "LPS"  # an axial DICOM series, index order column/row/slice
    assert set(result["timings_ms"]) == {"upload", "preprocess", "model_queue", "model", "postprocess", "total"}

    mask = load_mask(client, result)
    np.testing.assert_allclose(mask.affine, phantom.volume.affine, atol=1e-4)
    labels = np.asarray(mask.dataobj)
    assert labels.shape == phantom.volume.shape
    assert dice(labels == 1, phantom.label) >= 0.9

    voxel_ml = phantom.volume.voxel_volume_ml
    (organ,) = result["labels"]
    assert organ["name"] == "organ"
    assert organ["volume_ml"] == pytest.approx((labels == 1).sum() * voxel_ml, rel=1e-3)
    assert organ["volume_ml"] == pytest.approx(phantom.label.sum() * voxel_ml, rel=0.15)


def test_multipart_dcm_files_give_the_same_answer_as_the_zip(client, phantom, phantom_series):
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in phantom_series]
    response = client.post(SEGMENT, files=files)
    assert response.status_code == 200, response.text
    zipped = client.post(SEGMENT, content=zip_files(phantom_series), headers=ZIP)
    assert zipped.status_code == 200, zipped.text
    # The same files, however they are packed, are the same study: the same mask voxel for voxel.
    labels, expected = (np.asarray(load_mask(client, r.json()).dataobj) for r in (response, zipped))
    np.testing.assert_array_equal(labels, expected)
    assert dice(labels == 1, phantom.label) >= 0.9


def test_nifti_upload_is_segmented(client, phantom):
    buffer = io.BytesIO()
    image = nib.Nifti1Image(phantom.volume.array, phantom.volume.affine)
    buffer.write(gzip.compress(image.to_bytes()))
    response = client.post(SEGMENT, files={"file": ("ct.nii.gz", buffer.getvalue())})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["shape"] == list(phantom.volume.shape)
    assert dice(np.asarray(load_mask(client, result).dataobj) == 1, phantom.label) >= 0.9


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_a_body_sent_with_content_encoding_gives_the_plain_bodys_mask(client, phantom, encoding):
    plain = nib.Nifti1Image(phantom.volume.array, phantom.volume.affine).to_bytes()
    body = gzip.compress(plain) if encoding == "gzip" else zstandard.ZstdCompressor(level=3).compress(plain)
    octets = {"content-type": "application/octet-stream"}
    sent = client.post(SEGMENT, content=body, headers={**octets, "content-encoding": encoding})
    assert sent.status_code == 200, sent.text
    assert sent.json()["uploaded_bytes"] == len(plain)  # counted decoded, as the limit is
    reference = client.post(SEGMENT, content=plain, headers=octets)
    assert reference.status_code == 200, reference.text
    labels, expected = (np.asarray(load_mask(client, r.json()).dataobj) for r in (sent, reference))
    np.testing.assert_array_equal(labels, expected)


def test_pydicom_ct_sample_is_served_on_its_single_slice_grid(client):
    path = get_testdata_file("CT_small.dcm")
    response = client.post(SEGMENT, files={"file": ("CT_small.dcm", open(path, "rb").read())})
    assert response.status_code == 200, response.text
    assert response.json()["shape"] == [128, 128, 1]


def test_mr_study_sent_to_a_ct_model_is_refused_with_the_reason(client):
    path = get_testdata_file("MR_small.dcm")
    response = client.post(SEGMENT, files={"file": ("MR_small.dcm", open(path, "rb").read())})
    assert response.status_code == 422
    assert "MR" in response.json()["error"]["reason"]


def test_concurrent_requests_all_complete(client, phantom_series):
    body = zip_files(phantom_series[:12])
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: client.post(SEGMENT, content=body), range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    assert len({r.json()["result_id"] for r in responses}) == 4


def test_models_health_and_results_endpoints(client):
    models = client.get("/v1/models").json()["models"]
    assert [(m["name"], m["task"]) for m in models] == [
        ("ct-phantom-organ", "segmentation"),
        ("he-tile-tumour", "tile_classification"),
    ]
    assert client.get("/v1/models/ct-phantom-organ").json()["labels"] == {"0": "background", "1": "organ"}
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["status"] == "ready"
    missing = client.get("/v1/results/0123456789abcdef0123456789abcdef/mask.nii.gz")
    assert missing.status_code == 404 and "no such result" in missing.json()["error"]["reason"]
    assert client.get("/v1/results/..%2F..%2Fetc/mask.nii.gz").status_code == 404
