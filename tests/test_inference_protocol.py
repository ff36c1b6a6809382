"""The Open Inference Protocol (KServe v2) over HTTP on the live server, called with NVIDIA's own client library
(tritonclient): health, metadata, readiness, inference with binary and JSON tensors (its mask equal voxel for voxel to
the study API's for the same volume), tenancy and limits, and errors in the protocol's format."""

import gzip
import json
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from helpers import MODEL, SEGMENT, audit_lines, auth, exported_total, load_mask

INFER = f"/v2/models/{MODEL}/infer"
OUTPUTS = ("MASK", "LABEL_VALUES", "LABEL_NAMES", "LABEL_VOLUMES_ML")


@pytest.fixture(scope="module")
def v2_client(server_url):
    client = triton.InferenceServerClient(server_url.removeprefix("http://"), network_timeout=300)
    yield client
    client.close()


@pytest.fixture(scope="module")
def ct(phantom) -> tuple[np.ndarray, np.ndarray]:
    """The phantom CT as a client holding it in memory has it: int16 HU voxels (I, J, K) and the RAS affine."""
    return np.round(phantom.volume.array).astype(np.int16), np.asarray(phantom.volume.affine, dtype=np.float64)


def inputs_of(image: np.ndarray, affine: np.ndarray, binary: bool = True, datatype: str = "INT16") -> list:
    tensors = [triton.InferInput("IMAGE", [1, *image.shape], datatype), triton.InferInput("AFFINE", [4, 4], "FP64")]
    tensors[0].set_data_from_numpy(image[np.newaxis], binary_data=binary)
    tensors[1].set_data_from_numpy(affine, binary_data=binary)
    return tensors


def binary_outputs() -> list:
    return [triton.InferRequestedOutput(name, binary_data=True) for name in OUTPUTS]


def test_health_metadata_and_readiness(v2_client):
    assert v2_client.is_server_live() and v2_client.is_server_ready()
    assert "binary_tensor_data" in v2_client.get_server_metadata()["extensions"]
    assert v2_client.is_model_ready(MODEL) and v2_client.is_model_ready(MODEL, "1.0.0")

    metadata = v2_client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL and metadata["versions"] == ["1.0.0"]
    assert metadata["inputs"] == [
        {"name": "IMAGE", "datatype": "FP32", "shape": [1, -1, -1, -1]},
        {"name": "AFFINE", "datatype": "FP64", "shape": [4, 4]},
    ]
    assert metadata["outputs"] == [
        {"name": "MASK", "datatype": "UINT8", "shape": [1, -1, -1, -1]},
        {"name": "LABEL_VALUES", "datatype": "UINT8", "shape": [1]},
        {"name": "LABEL_NAMES", "datatype": "BYTES", "shape": [1]},
        {"name": "LABEL_VOLUMES_ML", "datatype": "FP64", "shape": [1]},
    ]
    assert v2_client.get_model_metadata(MODEL, "1.0.0")["versions"] == ["1.0.0"]


def test_binary_inference_gives_the_study_apis_mask_voxel_for_voxel(v2_client, client, ct):
    image, affine = ct
    result = v2_client.infer(MODEL, inputs_of(image, affine), outputs=binary_outputs(), request_id="ct-1")
    assert result.get_response()["id"] == "ct-1"
    mask = result.as_numpy("MASK")
    assert mask.dtype == np.uint8 and mask.shape == (1, *image.shape)
    assert all(o["parameters"]["binary_data_size"] > 0 for o in result.get_response()["outputs"])

    # The same volume as a NIfTI study through the study API: the same mask, voxel for voxel, and the same volumes.
    nifti = gzip.compress(nib.Nifti1Image(image, affine).to_bytes())
    study = client.post(SEGMENT, files={"file": ("ct.nii.gz", nifti)})
    assert study.status_code == 200, study.text
    expected = np.asarray(load_mask(client, study.json()).dataobj)
    assert (expected == 1).sum() > 1000  # the organ was found
    np.testing.assert_array_equal(mask[0], expected)
    (organ,) = study.json()["labels"]
    assert result.as_numpy("LABEL_VALUES").tolist() == [organ["label"]]
    assert result.as_numpy("LABEL_NAMES").tolist() == [organ["name"].encode()]
    assert result.as_numpy("LABEL_VOLUMES_ML").tolist() == pytest.approx([organ["volume_ml"]])

    # The inference's result is kept as a study's is.
    result_id = result.get_response()["parameters"]["result_id"]
    kept = client.get(f"/v1/results/{result_id}")
    assert kept.status_code == 200 and kept.json()["labels"] == study.json()["labels"], kept.text


def test_json_tensors_and_float_voxels_give_the_same_mask(v2_client, client, ct):
    image, affine = ct
    binary = v2_client.infer(MODEL, inputs_of(image, affine), outputs=binary_outputs()).as_numpy("MASK")
    as_json = v2_client.infer(
        MODEL,
        inputs_of(image.astype(np.float32), affine, binary=False, datatype="FP32"),
        outputs=[triton.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS],
        model_version="1.0.0",
    )
    assert all("data" in output for output in as_json.get_response()["outputs"])
    np.testing.assert_array_equal(as_json.as_numpy("MASK"), binary)
    assert as_json.as_numpy("LABEL_NAMES").tolist() == ["organ"]


def _v2_error(v2_client, call, status: str) -> str:
    with pytest.raises(InferenceServerException) as raised:
        call(v2_client)
    assert raised.value.status() == status, raised.value
    return raised.value.message()


@pytest.mark.parametrize(
    "call, status, reason",
    [
        pytest.param(lambda c: c.get_model_metadata("no-such-model"), "404", "unknown model", id="unknown model"),
        pytest.param(lambda c: c.get_model_metadata(MODEL, "9.9.9"), "404", "no version", id="unknown version"),
        pytest.param(lambda c: c.is_model_ready("no-such-model"), None, None, id="unknown model not ready"),
    ],
)
def test_unknown_models_are_404s(v2_client, call, status, reason):
    if status is None:
        assert call(v2_client) is False
    else:
        assert reason in _v2_error(v2_client, call, status)


@pytest.mark.parametrize(
    "make_inputs, status, reason",
    [
        pytest.param(
            lambda image, affine: inputs_of(image.astype(np.int64), affine, datatype="INT64"),
            "400",
            "IMAGE is sent as FP32 or INT16, not INT64",
            id="bad datatype",
        ),
        pytest.param(
            lambda image, affine: inputs_of(image[np.newaxis], affine)[:1] + inputs_of(image, affine)[1:],
            "400",
            "one volume [1, I, J, K]",
            id="bad shape",
        ),
        pytest.param(
            lambda image, affine: inputs_of(image, affine)[:1], "400", "the inputs are IMAGE, AFFINE", id="no affine"
        ),
        # Well-formed tensors whose content cannot be a study: refused as a study's would be.
        pytest.param(
            lambda image, affine: inputs_of(image, np.zeros((4, 4))), "422", "the AFFINE input", id="degenerate affine"
        ),
    ],
)
def test_tensors_the_model_does_not_take_are_refused(v2_client, ct, make_inputs, status, reason):
    image, affine = ct
    assert reason in _v2_error(v2_client, lambda c: c.infer(MODEL, make_inputs(image, affine)), status)


def test_errors_come_in_the_protocols_format_and_the_server_still_answers(client, ct):
    image, affine = ct
    unknown = client.post("/v2/models/no-such-model/infer", json={"inputs": []})
    assert unknown.status_code == 404 and unknown.json().keys() == {"error"}, unknown.text
    assert client.get("/v2/no/such/route").json().keys() == {"error"}
    wrong_method = client.get(INFER)
    assert wrong_method.status_code == 405 and wrong_method.json().keys() == {"error"}, wrong_method.text
    broken = client.post(INFER, content=b"{not json")
    assert broken.status_code == 400 and "JSON is invalid" in broken.json()["error"], broken.text
    short = client.post(INFER, content=b'{"inputs": []}', headers={"inference-header-content-length": "99"})
    assert short.status_code == 400 and "inference-header-content-length" in short.json()["error"], short.text
    # JSON tensor data of the wrong length for its shape.
    body = {"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1, 2, 2, 2], "data": [0.0] * 7}]}
    body["inputs"].append({"name": "AFFINE", "datatype": "FP64", "shape": [4, 4], "data": np.eye(4).ravel().tolist()})
    wrong = client.post(INFER, json=body)
    assert wrong.status_code == 400 and "7 elements" in wrong.json()["error"], wrong.text
    # Then a good request still succeeds, here in JSON from a plain HTTP client, binary output asked for by default.
    body["inputs"][0].update(shape=[1, *image.shape], data=image.ravel().tolist(), datatype="INT16")
    body["inputs"][1]["data"] = affine.ravel().tolist()
    body["parameters"] = {"binary_data_output": True}
    good = client.post(INFER, json=body)
    assert good.status_code == 200, good.text
    header_length = int(good.headers["inference-header-content-length"])
    header = json.loads(good.content[:header_length])
    mask_output = header["outputs"][0]
    assert mask_output["name"] == "MASK" and mask_output["parameters"]["binary_data_size"] == image.size


def _infers_counted() -> tuple[float, float]:
    """st-marys' successful infer responses, and its requests' model-stage latencies observed, as exported now."""
    responses = exported_total(
        "ray_medserve_requests_total", route="/v2/models/{name}/infer", code="200", tenant="st-marys"
    )
    latencies = exported_total(
        "ray_medserve_request_duration_seconds_count", stage="model", model=MODEL, tenant="st-marys"
    )
    return responses, latencies


def test_tenancy_limits_audit_and_metrics_apply(tenant_url, tenant_config, tenant_keys, ct):
    image, affine = ct
    # Only this test's requests count in the first: read at once. The second counts other tests' requests too.
    responses_before, latencies_before = _infers_counted()
    client = triton.InferenceServerClient(tenant_url.removeprefix("http://"), network_timeout=300)
    try:
        assert "API key" in _v2_error(client, lambda c: c.get_model_metadata(MODEL), "401")
        assert _v2_error(client, lambda c: c.infer(MODEL, inputs_of(image, affine)), "401")
        # rural-clinic may upload 80 kB at most: the volume is 1.3 MB.
        small = auth(tenant_keys["rural-clinic"])
        message = _v2_error(client, lambda c: c.infer(MODEL, inputs_of(image, affine), headers=small), "413")
        assert "80000" in message
        # research-lab may use mr-brain only.
        other = auth(tenant_keys["research-lab"])
        assert _v2_error(client, lambda c: c.get_model_metadata(MODEL, headers=other), "403")

        key = auth(tenant_keys["st-marys"])
        result = client.infer(MODEL, inputs_of(image, affine), outputs=binary_outputs(), headers=key)
        assert result.as_numpy("MASK").shape == (1, *image.shape)
        result_id = result.get_response()["parameters"]["result_id"]
    finally:
        client.close()
    (line,) = [line for line in audit_lines(tenant_config) if line["request_id"] == result_id]
    assert line["route"] == "infer" and line["tenant"] == "st-marys" and line["outcome"] == "ok"
    assert set(line["timings_ms"]) >= {"upload", "preprocess", "model", "postprocess", "queue", "total"}
    assert any(line["route"] == "infer" and line["status"] == 413 for line in audit_lines(tenant_config))
    deadline = time.monotonic() + 60  # Ray exports metrics every 2 s on the test cluster
    while (counted := _infers_counted())[0] <= responses_before and time.monotonic() < deadline:
        time.sleep(0.5)
    responses, latencies = counted
    assert responses == responses_before + 1 and latencies >= latencies_before + 1, counted


def test_the_documented_tritonclient_example_runs_as_written(server_url, tmp_path, monkeypatch):
    page = (Path(__file__).parents[1] / "docs" / "inference-protocol.md").read_text()
    (example,) = re.findall(r"^```python\n(.*?)^```", page, re.MULTILINE | re.DOTALL)
    monkeypatch.chdir(tmp_path)
    code = compile(example.replace("localhost:8000", server_url.removeprefix("http://")), "example", "exec")
    exec(code, {})
    assert (np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj) == 1).sum() > 1000
