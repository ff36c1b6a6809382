"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``, served through Ray Serve's
gRPC ingress as methods of the ingress deployment named like its RPCs (``InferenceServiceMethods``).

The messages are the protocol's own (``grpc_service.proto``, as the stubs ``tritonclient.grpc`` ships compile it):
Serve's proxy registers the service with ``tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_
server`` (``config.grpc``) and hands each call's message to the method. The data plane is the replica's
``serve_app.api.inference_protocol.DataPlane``, the HTTP routes' too (``serve_app.api.v2``): the same checks,
gatekeeper (the API key in the call's metadata, under the HTTP header's name: ``authorization: Bearer <key>`` or
``x-api-key``), quotas, upload limit, deadline, audit line, metrics and result.

A refusal is the gRPC status of medserve's HTTP status (``STATUS_CODES``: 400 INVALID_ARGUMENT, 401 UNAUTHENTICATED,
404 NOT_FOUND, 413 and 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED...) with its reason as the
details, and a ``retry-after`` trailing metadata where HTTP would send Retry-After.
"""

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from starlette.datastructures import State
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb

from serve_app.api import inference_protocol as protocol
from serve_app.api.dependencies import Services
from serve_app.api.inference_protocol import DataPlane, InputTensor, RequestedOutput
from serve_app.errors import (
    CLIENT_CLOSED,
    SHUTDOWN_RETRY_S,
    InvalidTensor,
    PayloadTooLarge,
    RequestError,
    ShuttingDown,
    status_of,
    unwrap,
)
from serve_app.observability import metrics
from serve_app.segmentation.tensor_segmentation import VolumeSegmentation, VolumeTensors
from serve_app.studies.upload import UploadBudget

__all__ = ["SERVICE", "STATUS_CODES", "InferenceServiceMethods", "serve_grpc_where_http_listens"]

logger = logging.getLogger("ray.serve")

SERVICE = "inference.GRPCInferenceService"
"""The service's full name, as a call's path names it (``/inference.GRPCInferenceService/ModelInfer``)."""
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CLIENT_CLOSED: grpc.StatusCode.CANCELLED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""medserve's HTTP statuses as gRPC status codes; any other is INTERNAL."""
# Where typed contents (InferTensorContents) keep each datatype's elements; FP16 has none (binary data only).
_CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class _GrpcCaller:
    """A gRPC call as the gatekeeper and the metrics read a caller (``inference_protocol.Caller``): its metadata as
    headers, and a state of its own."""

    def __init__(self, grpc_context: Any):
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
        self.headers: Mapping[str, str] = {key.lower(): value for key, value in metadata if isinstance(value, str)}
        self.scope: dict = {"state": {}}
        self.state = State(self.scope["state"])


def _rpc(method: str, empty: type) -> Callable:
    """An RPC of the service: its refusals (and errors) set as the call's status and details, an empty ``empty``
    message returned (the status makes the client discard it); every call counted in ``medserve_requests`` as
    route ``/inference.GRPCInferenceService/<method>``, method GRPC, with the HTTP status it stands for."""
    route = f"/{SERVICE}/{method}"

    def decorate(handle: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(self, request, grpc_context=None):
            caller = _GrpcCaller(grpc_context)
            status = 200
            try:
                return await handle(self, request, caller)
            except BaseException as e:
                status = status_of(e)
                error = unwrap(e)
                if not isinstance(error, Exception) or grpc_context is None:
                    raise  # cancelled: the client is gone
                if isinstance(error, RequestError):
                    reason, trailers = error.reason, _retry_after(error)
                else:
                    logger.error("inference call failed: %s", type(error).__name__)  # a message may quote a request
                    reason, trailers = "internal error in a processing stage", []
                grpc_context.set_code(STATUS_CODES.get(status, grpc.StatusCode.INTERNAL))
                grpc_context.set_details(reason)
                if trailers:
                    grpc_context.set_trailing_metadata(trailers)
                return empty()
            finally:
                metrics.record_response(route, "GRPC", status, metrics.tenant_of(caller.scope))

        call.__name__ = call.__qualname__ = method
        call.__doc__ = handle.__doc__
        return call

    return decorate


def _retry_after(error: RequestError) -> list[tuple[str, str]]:
    value = error.headers.get("Retry-After")
    return [("retry-after", value)] if value else []


class InferenceServiceMethods:
    """``inference.GRPCInferenceService``'s RPCs as methods of the ingress deployment (Serve's gRPC proxy calls the
    ingress's method named like the RPC, with the request's message and its ``grpc_context``). The class that mixes
    them in sets ``services`` (its replica's ``Services``) and ``drain`` (its ``DrainWatch``)."""

    services: Services
    drain: Any

    @property
    def _plane(self) -> DataPlane:
        return self.services.inference

    @_rpc("ServerLive", pb.ServerLiveResponse)
    async def ServerLive(self, request: pb.ServerLiveRequest, caller: _GrpcCaller) -> pb.ServerLiveResponse:
        """Live while the ingress answers."""
        return pb.ServerLiveResponse(live=True)

    @_rpc("ServerReady", pb.ServerReadyResponse)
    async def ServerReady(self, request: pb.ServerReadyRequest, caller: _GrpcCaller) -> pb.ServerReadyResponse:
        """Ready once every deployment answers."""
        return pb.ServerReadyResponse(ready=await self._plane.server_ready())

    @_rpc("ServerMetadata", pb.ServerMetadataResponse)
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, caller: _GrpcCaller) -> pb.ServerMetadataResponse:
        """medserve's name, version and extensions."""
        metadata = DataPlane.server_metadata()
        return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version, extensions=metadata.extensions)

    @_rpc("ModelReady", pb.ModelReadyResponse)
    async def ModelReady(self, request: pb.ModelReadyRequest, caller: _GrpcCaller) -> pb.ModelReadyResponse:
        """Whether the model (the version named, else its newest) and the stages it uses answer; NOT_FOUND for an
        unknown model or version."""
        ready = await self._plane.model_ready(caller, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    @_rpc("ModelMetadata", pb.ModelMetadataResponse)
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, caller: _GrpcCaller) -> pb.ModelMetadataResponse:
        """The model's versions, inputs and outputs, as ``GET /v2/models/{name}`` describes them."""
        metadata = await self._plane.model_metadata(caller, request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=metadata.name,
            versions=metadata.versions,
            platform=metadata.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.outputs],
        )

    @_rpc("ModelConfig", pb.ModelConfigResponse)
    async def ModelConfig(self, request: pb.ModelConfigRequest, caller: _GrpcCaller) -> pb.ModelConfigResponse:
        """The model's inputs and outputs in the shape of Triton's model configuration, as
        ``GET /v2/models/{name}/config`` gives them (what perf_analyzer reads)."""
        configuration = await self._plane.model_configuration(caller, request.name, request.version or None)

        def tensors(kind, configured):
            return [kind(name=t.name, data_type=t.data_type, dims=t.dims) for t in configured]

        return pb.ModelConfigResponse(
            config=model_config_pb2.ModelConfig(
                name=configuration.name,
                platform=configuration.platform,
                max_batch_size=configuration.max_batch_size,
                input=tensors(model_config_pb2.ModelInput, configuration.input),
                output=tensors(model_config_pb2.ModelOutput, configuration.output),
            )
        )

    @_rpc("ModelInfer", pb.ModelInferResponse)
    async def ModelInfer(self, request: pb.ModelInferRequest, caller: _GrpcCaller) -> pb.ModelInferResponse:
        """Segment one volume: IMAGE and AFFINE as ``raw_input_contents`` or typed contents, the outputs asked for
        (all four when none is named) as ``raw_output_contents``; parameter ``stat`` (bool) as ``?stat=true``."""
        if self.drain.draining:
            raise ShuttingDown("medserve is shutting down; retry shortly", SHUTDOWN_RETRY_S)
        plane = self._plane
        stat = _parameters(request.parameters).get("stat", False)
        if not isinstance(stat, bool):
            raise InvalidTensor("the parameter stat is true or false")

        async def read(budget: UploadBudget) -> VolumeTensors:
            # The message is in memory already: its bytes count against the request's upload limit all the same.
            size = request.ByteSize()
            if size > budget.max_bytes:
                raise PayloadTooLarge(f"the request is {size} bytes, over this server's limit of {budget.max_bytes}")
            budget.spend_bytes(size)
            return protocol.volume_of(_inputs_of(request))

        self.drain.in_flight += 1
        try:
            return await plane.infer(
                caller,
                request.model_name,
                request.model_version or None,
                stat,
                read,
                lambda result_id: f"/v1/results/{result_id}",
                lambda segmented: _answer(segmented, request, plane),
            )
        finally:
            self.drain.in_flight -= 1


def _parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {
        key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in parameters.items()
    }


def _inputs_of(request: pb.ModelInferRequest) -> list[InputTensor]:
    """The request's inputs, each with its ``raw_input_contents`` entry (all inputs raw, or none) or its typed
    contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidTensor(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: send every input as raw "
            "data, or none"
        )
    inputs = []
    for i, tensor in enumerate(request.inputs):
        shape = tuple(tensor.shape)
        field = _CONTENTS_FIELDS.get(tensor.datatype)
        values = getattr(tensor.contents, field) if field and tensor.HasField("contents") else None
        if raw:
            if values:
                raise InvalidTensor(f"{tensor.name[:64]} has both typed contents and raw_input_contents")
            inputs.append(InputTensor(tensor.name, tensor.datatype, shape, raw=raw[i]))
        else:
            inputs.append(InputTensor(tensor.name, tensor.datatype, shape, values=values))
    return inputs


def _answer(segmented: VolumeSegmentation, request: pb.ModelInferRequest, plane: DataPlane) -> pb.ModelInferResponse:
    """The infer answer: each output asked for as binary data in ``raw_output_contents``, as Triton answers."""
    answer = segmented.answer
    requested = [RequestedOutput(o.name, _parameters(o.parameters)) for o in request.outputs] or None
    response = pb.ModelInferResponse(model_name=answer.model.name, model_version=answer.model.version, id=request.id)
    response.parameters["result_id"].string_param = answer.result_id
    response.parameters["mask_url"].string_param = answer.mask_url
    for output in plane.outputs_of(segmented, requested):
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(bytes(protocol.raw_data(output)))
    return response


def serve_grpc_where_http_listens(host: str, max_receive_message_length: int) -> None:
    """In an ingress replica's process, before Serve starts the replica's own gRPC server (HAProxy's gRPC backend,
        ``RAY_SERVE_ENABLE_HA_PROXY``): that server bound to ``host`` (the HTTP API's address, where HAProxy reaches it)
        rather than every interface, and taking messages of up to ``max_receive_message_length`` bytes (its answers up
    to Ray's own limit, 2 GiB - 1).

        Ray 2.60's ``start_grpc_server`` binds ``[::]`` with no setting for the address, and this server has none of
        Ray's token checks: on a loopback config it would take inference calls from the network. Serve calls
        ``default_impl.add_grpc_address`` and reads ``grpc_util.DEFAULT_GRPC_SERVER_OPTIONS`` when it builds the server
        (after the deployment's ``__init__``), so both are set here, in this process only.
    """
    from ray.serve._private import default_impl, grpc_util
    from ray.serve._private.constants import RAY_SERVE_GRPC_MAX_MESSAGE_SIZE

    def add_grpc_address(server, address: str) -> None:
        port = address.rpartition(":")[2]
        bound = f"[{host}]" if ":" in host else host
        server.add_insecure_port(f"{bound}:{port}")

    default_impl.add_grpc_address = add_grpc_address
    grpc_util.DEFAULT_GRPC_SERVER_OPTIONS = [
        ("grpc.max_send_message_length", RAY_SERVE_GRPC_MAX_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", max_receive_message_length),
    ]
