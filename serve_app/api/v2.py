"""The Open Inference Protocol (KServe v2, which Triton speaks) over HTTP: health, model metadata and readiness, and
``infer`` with JSON tensors or the binary tensor data extension, so that tritonclient, perf_analyzer and v2 gateways
call medserve's segmentation models as they call Triton's.

The protocol's data plane is the replica's ``serve_app.api.inference_protocol.DataPlane``, shared with the gRPC
service (``serve_app.api.v2_grpc``); this module turns HTTP requests into its calls and its answers into the
protocol's JSON and bytes. An inference goes through the gatekeeper (API key, model rights, quotas, audit), the
upload limit, the request's deadline and the segment latency metrics as a study does, and its result is kept like a
study's (the answer's ``parameters.result_id``).

Errors from these routes are in the protocol's format, ``{"error": "<reason>"}`` with medserve's status for the
reason (400 for a tensor the model does not take, 404 for an unknown model, 413, 429, 503, 504...); a request refused
before any route runs (wrong Host, the server draining) gets medserve's own format.
"""

import functools
import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from serve_app.api import inference_protocol as protocol
from serve_app.api.dependencies import DataPlaneDep, declared_length, result_path
from serve_app.api.inference_protocol import (
    BYTES,
    DataPlane,
    InputTensor,
    ModelConfiguration,
    ModelMetadata,
    OutputTensor,
    RequestedOutput,
    ServerMetadata,
    TensorMetadata,
)
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
from serve_app.segmentation.tensor_segmentation import VolumeSegmentation, VolumeTensors
from serve_app.studies.upload import UploadBudget

__all__ = ["HEADER_LENGTH", "InferenceError", "ModelMetadata", "ServerMetadata", "TensorMetadata", "router"]

logger = logging.getLogger("ray.serve")

HEADER_LENGTH = "inference-header-content-length"
"""The binary tensor data extension's header: the length of the JSON that begins a body holding raw tensors."""
# A request's JSON part (its header, or the whole body without binary data) is parsed into Python objects: at most
# this many bytes of it. A volume of JSON numbers near it is a few million voxels; larger ones go as binary data.
_MAX_JSON_BYTES = 16 * 1024**2


class InferenceError(BaseModel):
    """The protocol's error: its reason; the status is the HTTP status."""

    error: str = Field(description="What was wrong, in words; never what was sent.")


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


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """The server's name, version and the protocol extensions it speaks."""
    return DataPlane.server_metadata()


@router.get("/v2/health/live", responses={200: {"description": "Live (empty body)."}})
async def live() -> Response:
    """200 while the server answers."""
    return Response(status_code=200)


@router.get("/v2/health/ready", responses={200: {"description": "Ready (empty body)."}, **_ERRORS})
async def ready(plane: DataPlaneDep) -> Response:
    """200 once every deployment answers, else 503 (the protocol reads any status but 200 as not ready)."""
    return _ready_answer(await plane.server_ready())


def _model_route(method: str, suffix: str = "", **options) -> Callable[[Callable], Callable]:
    """Register a handler of one model on ``/v2/models/{name}<suffix>`` (its newest version: ``model_version`` None)
    and on ``/v2/models/{name}/versions/{model_version}<suffix>``, the protocol's two paths for each model route. The
    plain path's route has no ``model_version`` parameter at all (not even in the query)."""

    def register(handler: Callable) -> Callable:
        signature = inspect.signature(handler)

        @functools.wraps(handler)
        async def newest_version(**kwargs):
            return await handler(model_version=None, **kwargs)

        newest_version.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p for p in signature.parameters.values() if p.name != "model_version"]
        )
        router.add_api_route(f"/v2/models/{{name}}{suffix}", newest_version, methods=[method], **options)
        router.add_api_route(
            f"/v2/models/{{name}}/versions/{{model_version}}{suffix}", handler, methods=[method], **options
        )
        return handler

    return register


@_model_route("GET", response_model=ModelMetadata, responses=_ERRORS)
async def model_metadata(
    name: str,
    request: Request,
    plane: DataPlaneDep,
    model_version: str | None = None,
) -> ModelMetadata:
    """The model's versions, inputs and outputs (datatypes and shapes), or those of the version the path names; see
    the documentation's Inference protocol page for what each tensor means."""
    return await plane.model_metadata(request, name, model_version)


@_model_route("GET", "/config", response_model=ModelConfiguration, responses=_ERRORS)
async def model_configuration(
    name: str,
    request: Request,
    plane: DataPlaneDep,
    model_version: str | None = None,
) -> ModelConfiguration:
    """The model's (or the version's the path names) inputs and outputs in the shape of Triton's model configuration
    (what perf_analyzer reads)."""
    return await plane.model_configuration(request, name, model_version)


@_model_route("GET", "/ready", responses={200: {"description": "Ready (empty body)."}, **_ERRORS})
async def model_ready(
    name: str,
    request: Request,
    plane: DataPlaneDep,
    model_version: str | None = None,
) -> Response:
    """200 once the model's newest version (or the version the path names) and the stages it uses answer, else 503."""
    return _ready_answer(await plane.model_ready(request, name, model_version))


@_model_route("POST", "/infer", responses=_ERRORS)
async def infer(
    name: str,
    request: Request,
    plane: DataPlaneDep,
    stat: bool = False,
    model_version: str | None = None,
) -> Response:
    """Segment one volume with the model's newest version, or the version the path names: inputs IMAGE (FP32 or
    INT16, [1, I, J, K]) and AFFINE (FP64, [4, 4]), as JSON data or binary data (``Inference-Header-Content-Length``);
    outputs MASK (UINT8, [1, I, J, K]), LABEL_VALUES, LABEL_NAMES and LABEL_VOLUMES_ML. ``?stat=true``: as for a
    study."""
    return await _infer(request, name, model_version, stat, plane)


@router.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
async def unknown_route(path: str, request: Request) -> Response:
    """What no route above takes, answered in the protocol's format: 405 for a route's path with another method."""
    if any(route.matches(request.scope)[0] == Match.PARTIAL for route in router.routes[:-1]):
        raise MethodNotAllowed(f"method {request.method} is not allowed on this route")
    raise RouteNotFound("no such route of the inference protocol; see /docs for the API")


def _ready_answer(ready: bool) -> Response:
    return Response(status_code=200 if ready else 503)


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
        return protocol.volume_of(_inputs_of(self.parsed, binary))


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


def _inputs_of(parsed: _InferRequest, binary: memoryview) -> list[InputTensor]:
    """The request's inputs, each with its JSON data or its slice of the binary data (in the inputs' order)."""
    inputs, offset = [], 0
    for tensor in parsed.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise InvalidTensor(f"{tensor.name[:64]} has neither JSON data nor binary_data_size")
            inputs.append(InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), values=tensor.data))
            continue
        if tensor.data is not None:
            raise InvalidTensor(f"{tensor.name[:64]} has both JSON data and binary data")
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidTensor(f"{tensor.name[:64]}'s binary_data_size must be a length within the body's binary data")
        raw = binary[offset : offset + size]
        inputs.append(InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), raw=raw))
        offset += size
    if offset != len(binary):
        raise InvalidTensor(f"the body has {len(binary) - offset} bytes of binary data that no input claims")
    return inputs


async def _infer(
    request: Request,
    name: str,
    model_version: str | None,
    stat: bool,
    plane: DataPlane,
) -> Response:
    body = _InferBody(request)
    return await plane.infer(
        request,
        name,
        model_version,
        stat,
        body.read,
        lambda result_id: result_path(request, result_id),
        lambda segmented: _answer(segmented, body.parsed, plane),
    )


def _answer(segmented: VolumeSegmentation, parsed: _InferRequest, plane: DataPlane) -> Response:
    """The infer answer: the outputs asked for (all of them when none is named), each as JSON or binary data."""
    answer = segmented.answer
    binary_default = _flag(parsed.parameters, "binary_data_output")
    requested = None if parsed.outputs is None else [RequestedOutput(o.name, o.parameters) for o in parsed.outputs]
    outputs, blobs = [], []
    for output in plane.outputs_of(segmented, requested):
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if output.parameters.get("binary_data", binary_default):
            raw = protocol.raw_data(output)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(output)
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


def _json_data(output: OutputTensor) -> list:
    return list(output.value) if output.datatype == BYTES else np.asarray(output.value).ravel().tolist()


def _flag(parameters: dict[str, Any], name: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InvalidTensor(f"the parameter {name} is true or false")
    return value
