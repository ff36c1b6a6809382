"""The Open Inference Protocol (KServe v2) over HTTP and gRPC on the live server, called with NVIDIA's own client
library (tritonclient): health, metadata, readiness, inference with binary and JSON tensors (its mask equal voxel for
voxel to the study API's for the same volume) and over gRPC with raw and typed contents (equal to the HTTP answer),
tenancy and limits, and errors in the protocol's format (HTTP statuses, gRPC status codes)."""

import gzip
import json
import re
import time
from pathlib import Path

import grpc
import kubernetes_validate
import nibabel as nib
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
import yaml
from ray.serve.schema import ServeDeploySchema
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from helpers import MODEL, SEGMENT, audit_lines, auth, exported_total, load_mask
from serve_app.config import GRPC_SERVICER_FUNCTION, load_config
from serve_app.manifests import render_manifests

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

    # Triton's model-configuration extension, which perf_analyzer reads first: no batch dimension, the same tensors.
    assert "model_configuration" in v2_client.get_server_metadata()["extensions"]
    configuration = v2_client.get_model_config(MODEL)
    assert configuration["max_batch_size"] == 0 and configuration["platform"] == metadata["platform"]
    assert configuration["input"] == [
        {"name": "IMAGE", "data_type": "TYPE_FP32", "dims": [1, -1, -1, -1]},
        {"name": "AFFINE", "data_type": "TYPE_FP64", "dims": [4, 4]},
    ]
    assert [(t["name"], t["data_type"]) for t in configuration["output"]] == [
        ("MASK", "TYPE_UINT8"),
        ("LABEL_VALUES", "TYPE_UINT8"),
        ("LABEL_NAMES", "TYPE_STRING"),
        ("LABEL_VOLUMES_ML", "TYPE_FP64"),
    ]
    assert v2_client.get_model_config(MODEL, "1.0.0") == configuration


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


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_documented_tritonclient_examples_run_as_written(protocol, server_url, app_config, tmp_path, monkeypatch):
    page = (Path(__file__).parents[1] / "docs" / "inference-protocol.md").read_text()
    examples = dict(
        zip(["http", "grpc"], re.findall(r"^```python\n(.*?)^```", page, re.MULTILINE | re.DOTALL), strict=True)
    )
    example = examples[protocol]
    assert f'"application": "{app_config.name}"' in examples["grpc"]  # the session's application is the example's
    monkeypatch.chdir(tmp_path)
    grpc_target = f"{app_config.http.host}:{app_config.grpc.port}"
    example = example.replace("localhost:8000", server_url.removeprefix("http://")).replace(
        "localhost:9000", grpc_target
    )
    exec(compile(example, "example", "exec"), {})
    assert (np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj) == 1).sum() > 1000


# Over gRPC: Serve's gRPC ingress serves every application of the cluster, and the `application` metadata names the one
# called (the tenant application runs beside the open one). The session's config enables it (conftest.py).


@pytest.fixture(scope="module")
def grpc_target(server_url, app_config) -> str:
    return f"{app_config.http.host}:{app_config.grpc.port}"


@pytest.fixture(scope="module")
def grpc_client(grpc_target):
    client = triton_grpc.InferenceServerClient(grpc_target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http_answer(v2_client, ct):
    """The phantom CT's answer over HTTP (binary tensors), which every gRPC answer must equal."""
    image, affine = ct
    return v2_client.infer(MODEL, inputs_of(image, affine), outputs=binary_outputs())


def application(config) -> dict[str, str]:
    """The gRPC metadata that names the application of ``config``."""
    return {"application": config.name}


def grpc_inputs_of(image: np.ndarray, affine: np.ndarray, datatype: str = "INT16") -> list:
    """IMAGE and AFFINE as tritonclient.grpc sends them: raw_input_contents."""
    tensors = [
        triton_grpc.InferInput("IMAGE", [1, *image.shape], datatype),
        triton_grpc.InferInput("AFFINE", [4, 4], "FP64"),
    ]
    tensors[0].set_data_from_numpy(image[np.newaxis])
    tensors[1].set_data_from_numpy(affine)
    return tensors


def _grpc_error(call) -> tuple[str, str]:
    """The gRPC status code and details a call ended with."""
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.status().removeprefix("StatusCode."), raised.value.message()


def test_grpc_health_metadata_and_readiness(grpc_client, v2_client, app_config):
    app = application(app_config)
    assert grpc_client.is_server_live(headers=app) and grpc_client.is_server_ready(headers=app)
    server = grpc_client.get_server_metadata(headers=app)
    assert server.name == "medserve" and "binary_tensor_data" in server.extensions
    assert grpc_client.is_model_ready(MODEL, headers=app) and grpc_client.is_model_ready(MODEL, "1.0.0", headers=app)

    # The model's metadata as over HTTP.
    metadata, over_http = grpc_client.get_model_metadata(MODEL, headers=app), v2_client.get_model_metadata(MODEL)
    assert metadata.name == MODEL and list(metadata.versions) == ["1.0.0"]
    assert metadata.platform == over_http["platform"]

    def tensors(listed) -> list[dict]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in listed]

    assert tensors(metadata.inputs) == over_http["inputs"] and tensors(metadata.outputs) == over_http["outputs"]
    assert list(grpc_client.get_model_metadata(MODEL, "1.0.0", headers=app).versions) == ["1.0.0"]

    # The model configuration as over HTTP (Triton's DataType enum names, dims, no batch dimension).
    configuration = grpc_client.get_model_config(MODEL, headers=app, as_json=True)["config"]
    assert configuration["name"] == MODEL and configuration.get("max_batch_size", 0) == 0
    over_http = v2_client.get_model_config(MODEL)
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in configuration["input"]] == [
        (t["name"], t["data_type"], t["dims"]) for t in over_http["input"]
    ]


def test_grpc_raw_inference_gives_the_http_answer(grpc_client, client, app_config, http_answer, ct):
    image, affine = ct
    result = grpc_client.infer(
        MODEL, grpc_inputs_of(image, affine), request_id="ct-grpc", headers=application(app_config), client_timeout=300
    )
    response = result.get_response()
    assert response.id == "ct-grpc" and (response.model_name, response.model_version) == (MODEL, "1.0.0")
    assert [output.name for output in response.outputs] == list(OUTPUTS) and len(response.raw_output_contents) == 4
    mask = result.as_numpy("MASK")
    assert mask.dtype == np.uint8 and mask.shape == (1, *image.shape) and (mask == 1).sum() > 1000
    np.testing.assert_array_equal(mask, http_answer.as_numpy("MASK"))
    for name in OUTPUTS[1:]:
        assert result.as_numpy(name).tolist() == http_answer.as_numpy(name).tolist()
    # Kept as a study's result is.
    result_id = response.parameters["result_id"].string_param
    kept = client.get(f"/v1/results/{result_id}")
    assert kept.status_code == 200 and response.parameters["mask_url"].string_param.endswith(f"{result_id}/mask.nii.gz")


@pytest.mark.parametrize(
    "call, code, reason",
    [
        pytest.param(
            lambda c, app, image, affine: c.get_model_metadata("no-such-model", headers=app),
            "NOT_FOUND",
            "unknown model",
            id="unknown model",
        ),
        pytest.param(
            lambda c, app, image, affine: c.is_model_ready(MODEL, "9.9.9", headers=app),
            "NOT_FOUND",
            "no version",
            id="unknown version",
        ),
        pytest.param(
            lambda c, app, image, affine: c.infer("no-such-model", grpc_inputs_of(image, affine), headers=app),
            "NOT_FOUND",
            "unknown model",
            id="infer unknown model",
        ),
        pytest.param(
            lambda c, app, image, affine: c.infer(MODEL, grpc_inputs_of(image[np.newaxis], affine), headers=app),
            "INVALID_ARGUMENT",
            "one volume [1, I, J, K]",
            id="wrong shape",
        ),
        pytest.param(
            lambda c, app, image, affine: c.infer(
                MODEL, grpc_inputs_of(image.astype(np.int64), affine, "INT64"), headers=app
            ),
            "INVALID_ARGUMENT",
            "IMAGE is sent as FP32 or INT16, not INT64",
            id="wrong datatype",
        ),
        pytest.param(
            lambda c, app, image, affine: c.infer(MODEL, grpc_inputs_of(image, np.zeros((4, 4))), headers=app),
            "INVALID_ARGUMENT",
            "the AFFINE input",
            id="degenerate affine",
        ),
    ],
)
def test_grpc_refusals_are_status_codes_with_the_reason(grpc_client, app_config, ct, call, code, reason):
    image, affine = ct
    got_code, message = _grpc_error(lambda: call(grpc_client, application(app_config), image, affine))
    assert got_code == code and reason in message, (got_code, message)


def test_grpc_typed_contents_give_the_same_mask(grpc_target, app_config, http_answer, ct):
    """Typed contents (int_contents for INT16, fp64_contents), which tritonclient does not send: the protocol's own
    stub. Sent after the refusals above, it also shows the server still answers."""
    image, affine = ct
    request = service_pb2.ModelInferRequest(model_name=MODEL, model_version="1.0.0")
    request.inputs.add(name="IMAGE", datatype="INT16", shape=[1, *image.shape]).contents.int_contents.extend(
        image.ravel().tolist()
    )
    request.inputs.add(name="AFFINE", datatype="FP64", shape=[4, 4]).contents.fp64_contents.extend(
        affine.ravel().tolist()
    )
    request.outputs.add(name="MASK")
    metadata = list(application(app_config).items())
    with grpc.insecure_channel(grpc_target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, metadata=metadata, timeout=300)
        # raw_input_contents for some inputs only: refused.
        partial = service_pb2.ModelInferRequest()
        partial.CopyFrom(request)
        partial.raw_input_contents.append(image.tobytes())
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(partial, metadata=metadata, timeout=60)
        assert (
            refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in refused.value.details()
        )
    (output,) = response.outputs
    assert output.name == "MASK" and output.datatype == "UINT8"
    mask = np.frombuffer(response.raw_output_contents[0], np.uint8).reshape(tuple(output.shape))
    np.testing.assert_array_equal(mask, http_answer.as_numpy("MASK"))


def test_ingress_replicas_serve_grpc_only_where_http_listens(server_url, app_config):
    """Ray binds a replica's gRPC server for HAProxy to every interface, without the token its other servers check;
    medserve binds it to http.host: it answers on loopback, and no socket of the ingress replicas beyond loopback (Ray's
    own servers) serves the inference service to a caller without the cluster's token."""
    from ray.util.state import list_actors

    actors = list_actors(
        filters=[("class_name", "=", f"ServeReplica:{app_config.name}:Ingress"), ("state", "=", "ALIVE")]
    )
    listening = [
        (connection.laddr.ip, connection.laddr.port)
        for actor in actors
        for connection in psutil.Process(actor.pid).net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    ]

    def answer(port: int, method: str) -> object:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                return getattr(stub, method)(getattr(service_pb2, f"{method}Request")(), timeout=10)
            except grpc.RpcError as e:
                return e.code()

    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}  # gRPC binds 127.0.0.1 as an IPv4-mapped IPv6 socket
    live = {port: answer(port, "ServerLive") for ip, port in listening if ip in loopback}
    assert service_pb2.ServerLiveResponse(live=True) in live.values(), (listening, live)
    beyond = {port: answer(port, "ModelInfer") for ip, port in listening if ip not in loopback}
    not_served = {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED}
    assert beyond and set(beyond.values()) <= not_served, (listening, beyond)


def _grpc_infers_counted() -> float:
    """st-marys' successful ModelInfer calls, as exported now."""
    route = "/inference.GRPCInferenceService/ModelInfer"
    return exported_total("ray_medserve_requests_total", route=route, method="GRPC", code="200", tenant="st-marys")


def test_grpc_api_keys_limits_audit_and_metrics(grpc_target, tenant_url, tenant_config, tenant_keys, ct):
    image, affine = ct
    app = application(tenant_config)
    counted_before = _grpc_infers_counted()
    client = triton_grpc.InferenceServerClient(grpc_target)
    try:
        code, message = _grpc_error(lambda: client.get_model_metadata(MODEL, headers=app))
        assert code == "UNAUTHENTICATED" and "API key" in message
        wrong_key = {**app, **auth("msk_not-a-key")}
        assert _grpc_error(lambda: client.infer(MODEL, grpc_inputs_of(image, affine), headers=wrong_key)) == (
            "UNAUTHENTICATED",
            "the API key is not valid",
        )
        # rural-clinic may upload 80 kB at most: the volume is 1.3 MB.
        small = {**app, **auth(tenant_keys["rural-clinic"])}
        code, message = _grpc_error(lambda: client.infer(MODEL, grpc_inputs_of(image, affine), headers=small))
        assert code == "RESOURCE_EXHAUSTED" and "80000" in message
        # research-lab may use mr-brain only.
        other = {**app, **auth(tenant_keys["research-lab"])}
        assert _grpc_error(lambda: client.get_model_metadata(MODEL, headers=other))[0] == "PERMISSION_DENIED"

        key = {**app, "x-api-key": tenant_keys["st-marys"]}  # the HTTP header's other name
        result = client.infer(MODEL, grpc_inputs_of(image, affine), headers=key, client_timeout=300)
        assert result.as_numpy("MASK").shape == (1, *image.shape)
        result_id = result.get_response().parameters["result_id"].string_param
    finally:
        client.close()
    lines = audit_lines(tenant_config)
    (line,) = [line for line in lines if line["request_id"] == result_id]
    assert line["route"] == "infer" and line["tenant"] == "st-marys" and line["outcome"] == "ok"
    assert set(line["timings_ms"]) >= {"upload", "preprocess", "model", "postprocess", "queue", "total"}
    assert any(
        line["route"] == "infer" and line["status"] == 413 and line["tenant"] == "rural-clinic" for line in lines
    )
    deadline = time.monotonic() + 60  # Ray exports metrics every 2 s on the test cluster
    while (counted := _grpc_infers_counted()) <= counted_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert counted == counted_before + 1


def test_the_grpc_service_is_off_by_default_and_rendered_into_the_cluster_manifests_when_enabled(tmp_path):
    """No gRPC port unless the config enables one; enabled, Serve's gRPC options, the pods' port, the NetworkPolicy and
    a Service of its own (each passing Serve's or Kubernetes' schema)."""
    default = load_config()
    assert not default.grpc.enabled and default.grpc.serve_start_options() == {}
    # Ray binds a gRPC port of its proxy to every interface: an open server (no tenants) must accept that in words.
    assert "grpc.enabled" in load_config(overrides={"grpc.enabled": True}).open_server_refusal()
    assert load_config(overrides={"grpc.enabled": True, "http.allow_open": True}).open_server_refusal() is None
    off = render_manifests(default, None)
    assert "grpc_options" not in yaml.safe_load(off["serve_config.yaml"]) and "grpc" not in off["rayservice.yaml"]

    path = tmp_path / "medserve.yaml"
    path.write_text(yaml.safe_dump({"tenants": {}, "grpc": {"enabled": True, "port": 9001}}))
    files = render_manifests(load_config(path), path)
    expected = {"port": 9001, "grpc_servicer_functions": [GRPC_SERVICER_FUNCTION]}
    assert yaml.safe_load(files["serve_config.yaml"])["grpc_options"] == expected
    ServeDeploySchema.model_validate(yaml.safe_load(files["serve_config.yaml"]))
    objects = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(files["rayservice.yaml"]) if d}
    cluster = objects["RayService", "medserve"]["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]]:
        (container,) = template["spec"]["containers"]
        assert {"name": "grpc", "containerPort": 9001} in container["ports"]
    assert {"protocol": "TCP", "port": 9001} in objects["NetworkPolicy", "medserve-ray"]["spec"]["ingress"][0]["ports"]
    service = objects["Service", "medserve-grpc"]
    assert service["spec"]["ports"][0]["port"] == 9001 and service["spec"]["selector"]["ray.io/serve"] == "true"
    kubernetes_validate.validate(service, "1.33.0", strict=True)


def test_each_model_route_answers_on_its_plain_and_its_versioned_path_and_only_there_takes_a_version():
    """One handler an endpoint, on both of the protocol's paths: the plain path's route documents no model_version
    (not even in the query), the versioned path's names it in the path."""
    from fastapi import FastAPI

    from serve_app.api import v2

    app = FastAPI()
    app.include_router(v2.router)
    paths = app.openapi()["paths"]
    for suffix, method in (("", "get"), ("/config", "get"), ("/ready", "get"), ("/infer", "post")):
        plain = paths[f"/v2/models/{{name}}{suffix}"][method]
        versioned = paths[f"/v2/models/{{name}}/versions/{{model_version}}{suffix}"][method]
        assert "model_version" not in {p["name"] for p in plain.get("parameters", [])}, suffix
        assert {"name": "model_version", "in": "path"}.items() <= next(
            p for p in versioned["parameters"] if p["name"] == "model_version"
        ).items(), suffix
        assert plain["description"] == versioned["description"] and plain["responses"] == versioned["responses"]
