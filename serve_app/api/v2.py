"""The Open Inference Protocol (KServe v2, which Triton speaks) over HTTP: health, model metadata and readiness, and
``infer`` with JSON tensors or the binary tensor data extension, so that tritonclient, perf_analyzer and v2 gateways
call medserve's segmentation models as they call Triton's.

The tensors and what they mean are ``TensorSegmentation``'s (``serve_app.segmentation.tensor_segmentation``); this
module turns them into the protocol's JSON and bytes. An inference goes through the gatekeeper (API key, model rights,
quotas, audit), the upload limit, the request's deadline and the segment latency metrics as a study does, and its
result is kept like a study's (the answer's ``parameters.result_id``).

Errors from these routes are in the protocol's format, ``{"error": "<reason>"}`` with medserve's status for the
reason (400 for a tensor the model does not take, 404 for an unknown model, 413, 429, 503, 504...); a request refused
before any route runs (wrong Host, the server draining) gets medserve's own format.
"""

import json
import logging
import struct
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from serve_app.api.dependencies import GatekeeperDep, RepositoryDep, SegmentationDep, declared_length, result_path
from serve_app.errors import (
    BadRequest,
    InvalidTensor,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestError,
    RouteNotFound,
    UnsupportedMediaType,
    unwrap,
)
from serve_app.model_spec import ModelSpec
from serve_app.observability import metrics
from serve_app.segmentation.service import SegmentationService
from serve_app.segmentation.tensor_segmentation import (
    TensorSegmentation,
    TensorSpec,
    VolumeSegmentation,
    VolumeTensors,
)
from serve_app.studies.upload import UploadBudget

__all__ = ["HEADER_LENGTH", "InferenceError", "ModelMetadata", "ServerMetadata", "TensorMetadata", "router"]

logger = logging.getLogger("ray.serve")

HEADER_LENGTH = "inference-header-content-length"
"""The binary tensor data extension's header: the length of the JSON that begins a body holding raw tensors."""
# A request's JSON part (its header, or the whole body without binary data) is parsed into Python objects: at most
# this many bytes of it. A volume of JSON numbers near it is a few million voxels; larger ones go as binary data.
_MAX_JSON_BYTES = 16 * 1024**2
# The protocol's datatypes as numpy's, little-endian as the binary extension sends them; BYTES has no numpy type.
_DTYPES = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BYTES = "BYTES"
# What each input may be sent as: the first is the one the model's metadata names.
_ACCEPTED = {"IMAGE": ("FP32", "INT16"), "AFFINE": ("FP64", "FP32")}
_EXTENSIONS = ["binary_tensor_data"]


class InferenceError(BaseModel):
    """The protocol's error: its reason; the status is the HTTP status."""

    error: str = Field(description="What was wrong, in words; never what was sent.")


class TensorMetadata(BaseModel):
    """One input or output of a model."""

    name: str = Field(description="The tensor's name in an infer request or answer.")
    datatype: str = Field(description="The protocol's datatype, e.g. FP32, UINT8, BYTES.")
    shape: list[int] = Field(description="Its shape; -1 for a dimension of any length.")


class ModelMetadata(BaseModel):
    """A model as the protocol describes it."""

    name: str = Field(description="The model's name.")
    versions: list[str] = Field(description="Its versions served, newest first (the one asked for, with a version).")
    platform: str = Field(description="What runs it: medserve's segmentation pipeline.")
    inputs: list[TensorMetadata] = Field(description="What an infer request sends.")
    outputs: list[TensorMetadata] = Field(description="What an infer answer may hold.")


class ServerMetadata(BaseModel):
    """The server as the protocol describes it."""

    name: str = Field(description="medserve.")
    version: str = Field(description="medserve's version.")
    extensions: list[str] = Field(description="The protocol's extensions it speaks.")


class _InputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = {}
    data: Any = None


class _RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = {}


class _InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = {}
    inputs: list[_InputTensor]
    outputs: list[_RequestedOutput] | None = None


class _InferenceRoute(APIRoute):
    """A route whose errors are answered in the protocol's format, whoever raised them: the gatekeeper, a stage behind
    a handle (wrapped by Ray), FastAPI's parameter validation."""

    def get_route_handler(self) -> Callable:
        handle = super().get_route_handler()

        async def handle_in_protocol(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as e:
                problems = "; ".join(f"{' '.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
                return _error(BadRequest(f"invalid request parameters ({problems})"))
            except ClientDisconnect:
                raise  # the client is gone: the ingress counts it as 499
            except Exception as e:
                error = unwrap(e)
                if isinstance(error, RequestError):
                    return _error(error)
                logger.error("inference request failed: %s", type(error).__name__)  # a message may quote the request
                return JSONResponse({"error": "internal error in a processing stage"}, status_code=500)

        return handle_in_protocol


def _error(error: RequestError) -> JSONResponse:
    return JSONResponse({"error": error.reason}, status_code=error.status_code, headers=error.headers)


_ERRORS = {
    status: {"model": InferenceError, "description": description}
    for status, description in {
        400: "A tensor the model does not take (name, datatype, shape, data size), or a malformed request.",
        401: "No API key, or one that is not valid (with tenants configured).",
        403: "The tenant may not use this model.",
        404: "Unknown model or version.",
        413: "The body, its JSON part or the volume over the server's or the tenant's limits.",
        422: "Voxels that are not finite, a degenerate affine, or a model that does not segment volumes.",
        429: "Over the tenant's quota (Retry-After).",
        503: "Not ready, or every replica busy (Retry-After).",
        504: "The request's deadline passed; its work was cancelled.",
    }.items()
}

router = APIRouter(route_class=_InferenceRoute, tags=["Open Inference Protocol (v2)"])


async def _tensor_segmentation(segmentation: SegmentationDep) -> TensorSegmentation:
    return TensorSegmentation(segmentation)


TensorSegmentationDep = Annotated[TensorSegmentation, Depends(_tensor_segmentation)]


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """The server's name, version and the protocol extensions it speaks."""
    try:
        medserve_version = version("medserve")
    except PackageNotFoundError:
        medserve_version = "unknown"
    return ServerMetadata(name="medserve", version=medserve_version, extensions=_EXTENSIONS)


@router.get("/v2/health/live", responses={200: {"description": "Live (empty body)."}})
async def live() -> Response:
    """200 while the server answers."""
    return Response(status_code=200)


@router.get("/v2/health/ready", responses={200: {"description": "Ready (empty body)."}, **_ERRORS})
async def ready(tensors: TensorSegmentationDep) -> Response:
    """200 once every deployment answers, else 503 (the protocol reads any status but 200 as not ready)."""
    return Response(status_code=200 if await tensors.ready() else 503)


@router.get("/v2/models/{name}", response_model=ModelMetadata, responses=_ERRORS)
async def model_metadata(
    name: str, request: Request, gatekeeper: GatekeeperDep, repository: RepositoryDep, tensors: TensorSegmentationDep
) -> ModelMetadata:
    """The model's versions, inputs and outputs (datatypes and shapes); see the documentation's Inference protocol
    page for what each tensor means."""
    async with gatekeeper.visit(request, "models", model=name):
        versions = [spec.version for spec in repository.versions(name)]
        return _metadata(repository.get(name), versions, tensors)


@router.get("/v2/models/{name}/versions/{model_version}", response_model=ModelMetadata, responses=_ERRORS)
async def model_version_metadata(
    name: str,
    model_version: str,
    request: Request,
    gatekeeper: GatekeeperDep,
    repository: RepositoryDep,
    tensors: TensorSegmentationDep,
) -> ModelMetadata:
    """One version of the model, as ``GET /v2/models/{name}`` describes it."""
    async with gatekeeper.visit(request, "models", model=name, version=model_version):
        spec = repository.get(name, model_version)
        return _metadata(spec, [spec.version], tensors)


@router.get("/v2/models/{name}/ready", responses={200: {"description": "Ready (empty body)."}, **_ERRORS})
async def model_ready(
    name: str, request: Request, gatekeeper: GatekeeperDep, repository: RepositoryDep, tensors: TensorSegmentationDep
) -> Response:
    """200 once the model's newest version and the stages it uses answer, else 503."""
    async with gatekeeper.visit(request, "models", model=name):
        return await _ready_answer(repository.get(name), tensors)


@router.get("/v2/models/{name}/versions/{model_version}/ready", responses=_ERRORS)
async def model_version_ready(
    name: str,
    model_version: str,
    request: Request,
    gatekeeper: GatekeeperDep,
    repository: RepositoryDep,
    tensors: TensorSegmentationDep,
) -> Response:
    """200 once this version of the model and the stages it uses answer, else 503."""
    async with gatekeeper.visit(request, "models", model=name, version=model_version):
        return await _ready_answer(repository.get(name, model_version), tensors)


@router.post("/v2/models/{name}/infer", responses=_ERRORS)
async def infer(
    name: str,
    request: Request,
    gatekeeper: GatekeeperDep,
    segmentation: SegmentationDep,
    tensors: TensorSegmentationDep,
    stat: bool = False,
) -> Response:
    """Segment one volume with the model's newest version: inputs IMAGE (FP32 or INT16, [1, I, J, K]) and AFFINE
    (FP64, [4, 4]), as JSON data or binary data (``Inference-Header-Content-Length``); outputs MASK (UINT8,
    [1, I, J, K]), LABEL_VALUES, LABEL_NAMES and LABEL_VOLUMES_ML. ``?stat=true``: as for a study."""
    return await _infer(request, name, None, stat, gatekeeper, segmentation, tensors)


@router.post("/v2/models/{name}/versions/{model_version}/infer", responses=_ERRORS)
async def infer_with_version(
    name: str,
    model_version: str,
    request: Request,
    gatekeeper: GatekeeperDep,
    segmentation: SegmentationDep,
    tensors: TensorSegmentationDep,
    stat: bool = False,
) -> Response:
    """Segment one volume with one version of the model; the tensors as for ``/v2/models/{name}/infer``."""
    return await _infer(request, name, model_version, stat, gatekeeper, segmentation, tensors)


@router.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
async def unknown_route(path: str, request: Request) -> Response:
    """What no route above takes, answered in the protocol's format: 405 for a route's path with another method."""
    if any(route.matches(request.scope)[0] == Match.PARTIAL for route in router.routes[:-1]):
        raise MethodNotAllowed(f"method {request.method} is not allowed on this route")
    raise RouteNotFound("no such route of the inference protocol; see /docs for the API")


async def _ready_answer(spec: ModelSpec, tensors: TensorSegmentation) -> Response:
    tensors.signature(spec)  # 422 for a model that does not segment volumes
    return Response(status_code=200 if await tensors.model_ready(spec) else 503)


def _metadata(spec: ModelSpec, versions: list[str], tensors: TensorSegmentation) -> ModelMetadata:
    signature = tensors.signature(spec)
    return ModelMetadata(
        name=spec.name,
        versions=versions,
        platform="medserve_segmentation",
        inputs=[_tensor_metadata(t, _ACCEPTED[t.name][0]) for t in signature.inputs],
        outputs=[_tensor_metadata(t) for t in signature.outputs],
    )


def _tensor_metadata(tensor: TensorSpec, datatype: str | None = None) -> TensorMetadata:
    return TensorMetadata(name=tensor.name, datatype=datatype or _datatype_of(tensor), shape=list(tensor.shape))


def _datatype_of(tensor: TensorSpec) -> str:
    if tensor.dtype is None:
        return _BYTES
    return next(name for name, dtype in _DTYPES.items() if dtype == tensor.dtype.newbyteorder("<"))


class _InferBody:
    """An infer request's body, read within the request's upload budget once the gatekeeper has let it in; what it
    asks for is kept for the answer."""

    def __init__(self, request: Request):
        self.request = request
        self.parsed: _InferRequest | None = None

    async def read(self, budget: UploadBudget) -> VolumeTensors:
        header_length = self.request.headers.get(HEADER_LENGTH)
        declared = declared_length(self.request)
        if header_length is None and declared is not None and declared > _MAX_JSON_BYTES:
            raise _json_too_large()
        body = await _read_body(self.request, budget)
        if header_length is None:
            header, binary = body, memoryview(b"")
        else:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise InvalidTensor(f"the {HEADER_LENGTH} header is not a length within the body")
            header, binary = body[: int(header_length)], body[int(header_length) :]
        if len(header) > _MAX_JSON_BYTES:
            raise _json_too_large()
        self.parsed = _parse(header)
        return _volume_of(self.parsed, binary)


def _json_too_large() -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request's JSON is over {_MAX_JSON_BYTES} bytes; send large tensors as binary data ({HEADER_LENGTH})"
    )


async def _read_body(request: Request, budget: UploadBudget) -> memoryview:
    """The whole body, in memory (the volume is written to the upload folder from it); 413 past the budget."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType("an inference request's body is not decoded: send it without Content-Encoding")
    declared = declared_length(request)
    if declared is not None and declared > budget.max_bytes:
        raise PayloadTooLarge(f"the request is {declared} bytes, over this server's limit of {budget.max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        budget.spend_bytes(len(chunk))
        body += chunk
    return memoryview(body)


def _parse(header: memoryview) -> _InferRequest:
    try:
        return _InferRequest.model_validate_json(bytes(header))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise InvalidTensor(f"the inference request's JSON is invalid ({problems[:500]})") from None


def _volume_of(parsed: _InferRequest, binary: memoryview) -> VolumeTensors:
    """The IMAGE and AFFINE of a request, from its JSON data or its binary data (in the inputs' order)."""
    names = [tensor.name for tensor in parsed.inputs]
    if sorted(names) != sorted(_ACCEPTED):
        raise InvalidTensor(f"the inputs are {', '.join(_ACCEPTED)}, each once; the request has {names[:8]}")
    arrays, offset = {}, 0
    for tensor in parsed.inputs:
        arrays[tensor.name], offset = _array_of(tensor, binary, offset)
    if offset != len(binary):
        raise InvalidTensor(f"the body has {len(binary) - offset} bytes of binary data that no input claims")
    image = arrays["IMAGE"]
    if image.ndim != 4 or image.shape[0] != 1:
        raise InvalidTensor(f"IMAGE has shape {list(image.shape)}; one volume [1, I, J, K] is taken")
    if arrays["AFFINE"].shape != (4, 4):
        raise InvalidTensor(f"AFFINE has shape {list(arrays['AFFINE'].shape)}; [4, 4] is taken")
    return VolumeTensors(image=image[0], affine=arrays["AFFINE"].astype(np.float64))


def _array_of(tensor: _InputTensor, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """One input's array and where the next input's binary data begins."""
    accepted = _ACCEPTED[tensor.name]
    if tensor.datatype not in accepted:
        raise InvalidTensor(f"{tensor.name} is sent as {' or '.join(accepted)}, not {tensor.datatype[:16]}")
    dtype, shape = _DTYPES[tensor.datatype], tuple(tensor.shape)
    if any(n < 0 for n in shape):
        raise InvalidTensor(f"{tensor.name}'s shape {list(shape)} has a negative dimension")
    count = int(np.prod(shape, dtype=np.int64))
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise InvalidTensor(f"{tensor.name} has both JSON data and binary data")
        if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
            raise InvalidTensor(
                f"{tensor.name}'s binary_data_size must be {count * dtype.itemsize} bytes for its shape and "
                "datatype, within the body's binary data"
            )
        return np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape), offset + size
    if tensor.data is None:
        raise InvalidTensor(f"{tensor.name} has neither JSON data nor binary_data_size")
    try:
        array = np.asarray(tensor.data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise InvalidTensor(f"{tensor.name}'s JSON data are not {tensor.datatype} numbers") from None
    if array.size != count:
        raise InvalidTensor(f"{tensor.name} has {array.size} elements of data for shape {list(shape)}")
    return array.reshape(shape), offset


async def _infer(
    request: Request,
    name: str,
    model_version: str | None,
    stat: bool,
    gatekeeper: GatekeeperDep,
    segmentation: SegmentationService,
    tensors: TensorSegmentation,
) -> Response:
    visiting = gatekeeper.visit(request, "infer", model=name, version=model_version, stat=stat, admit=True)
    async with visiting as visit:
        body = _InferBody(request)
        segmented = await tensors.segment(visit, name, body.read, result_path(request, visit.request_id))
        metrics.observe_segment(request, name, segmented.answer.timings_ms.model_dump())
        return _answer(segmented, body.parsed, tensors)


def _answer(segmented: VolumeSegmentation, parsed: _InferRequest, tensors: TensorSegmentation) -> Response:
    """The infer answer: the outputs asked for (all of them when none is named), each as JSON or binary data."""
    answer = segmented.answer
    values = {
        "MASK": segmented.mask[np.newaxis],
        "LABEL_VALUES": segmented.label_values,
        "LABEL_NAMES": segmented.label_names,
        "LABEL_VOLUMES_ML": segmented.label_volumes_ml,
    }
    spec = tensors.segmentation.repository.get(answer.model.name, answer.model.version)
    specs = {t.name: t for t in tensors.signature(spec).outputs}
    binary_default = _flag(parsed.parameters, "binary_data_output")
    requested = parsed.outputs if parsed.outputs is not None else [_RequestedOutput(name=n) for n in values]
    outputs, blobs = [], []
    for output in requested:
        if output.name not in values:
            raise InvalidTensor(f"the outputs are {', '.join(values)}; there is no {output.name[:64]!r}")
        if "classification" in output.parameters:
            raise InvalidTensor("the classification extension is not supported: ask for the outputs themselves")
        datatype = _datatype_of(specs[output.name])
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype}
        value = values[output.name]
        entry["shape"] = [len(value)] if datatype == _BYTES else list(value.shape)
        if output.parameters.get("binary_data", binary_default):
            raw = _bytes_data(value) if datatype == _BYTES else np.ascontiguousarray(value, _DTYPES[datatype]).data
            entry["parameters"] = {"binary_data_size": len(raw) if isinstance(raw, bytes) else raw.nbytes}
            blobs.append(raw)
        else:
            entry["data"] = list(value) if datatype == _BYTES else value.ravel().tolist()
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": answer.model.name,
        "model_version": answer.model.version,
        "outputs": outputs,
        "parameters": {"result_id": answer.result_id, "mask_url": answer.mask_url},
    }
    if parsed.id is not None:
        document["id"] = parsed.id
    header = json.dumps(document).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def _flag(parameters: dict[str, Any], name: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InvalidTensor(f"the parameter {name} is true or false")
    return value


def _bytes_data(strings: list[str]) -> bytes:
    """BYTES elements as the binary extension sends them: each one's length (4 bytes, little-endian), then it."""
    encoded = [s.encode() for s in strings]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
