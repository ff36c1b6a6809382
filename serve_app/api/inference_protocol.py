"""The Open Inference Protocol's data plane (KServe v2, which Triton speaks), whatever carries it: ``DataPlane``, one
per ingress replica (``Services.inference``). The HTTP routes (``serve_app.api.v2``) and the gRPC service
(``serve_app.api.v2_grpc``) each turn their request into its calls and its answers into their own format, so both run
the same checks, gatekeeper, segmentation, metrics and outputs.

The tensors and what they mean are ``TensorSegmentation``'s (``serve_app.segmentation.tensor_segmentation``); here
they get the protocol's datatypes (FP32, INT16, BYTES...). Every call goes through the gatekeeper (API key, model
rights, quotas, audit) with the ``caller``: the HTTP request, or what a gRPC call's metadata says (``Caller``).
"""

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, Field

from serve_app.errors import InvalidTensor
from serve_app.model_repository import ModelRepository
from serve_app.observability import metrics
from serve_app.segmentation.service import SegmentationService
from serve_app.segmentation.tensor_segmentation import (
    ReadVolume,
    TensorSegmentation,
    TensorSpec,
    VolumeSegmentation,
    VolumeTensors,
)
from serve_app.tenancy.gatekeeper import Gatekeeper

__all__ = [
    "ACCEPTED",
    "BYTES",
    "DTYPES",
    "EXTENSIONS",
    "OUTPUT_NAMES",
    "Caller",
    "DataPlane",
    "InputTensor",
    "ModelConfiguration",
    "ModelMetadata",
    "OutputTensor",
    "RequestedOutput",
    "ServerMetadata",
    "TensorMetadata",
    "array_of",
    "bytes_data",
    "raw_data",
    "volume_of",
]

# The protocol's datatypes as numpy's, little-endian as binary data is sent; BYTES has no numpy type.
DTYPES = {
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
BYTES = "BYTES"
ACCEPTED = {"IMAGE": ("FP32", "INT16"), "AFFINE": ("FP64", "FP32")}
"""What each input may be sent as: the first is the one the model's metadata names."""
OUTPUT_NAMES = ("MASK", "LABEL_VALUES", "LABEL_NAMES", "LABEL_VOLUMES_ML")
"""Every output of an infer answer, in the order they are returned when none is named."""
EXTENSIONS = ["binary_tensor_data", "model_configuration"]

Answer = TypeVar("Answer")


class Caller(Protocol):
    """Who sends a request, as the gatekeeper and the metrics read it: its headers (HTTP's, or a gRPC call's
    metadata, lower-case), its ``state`` (the tenant is noted on it) and ``scope["state"]`` (the same, read back)."""

    headers: Mapping[str, str]
    state: Any
    scope: dict


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


class TensorConfiguration(BaseModel):
    """One input or output in Triton's model configuration."""

    name: str = Field(description="The tensor's name.")
    data_type: str = Field(description="Triton's type name: TYPE_FP32, TYPE_UINT8, TYPE_STRING (the protocol's BYTES).")
    dims: list[int] = Field(description="Its shape; -1 for a dimension of any length.")


class ModelConfiguration(BaseModel):
    """A model as Triton's model-configuration extension describes it (``GET /v2/models/{name}/config``), which load
    generators such as ``perf_analyzer`` read before they send anything. medserve batches requests itself: a request
    holds one volume, so ``max_batch_size`` is 0 (no batch dimension in the shapes)."""

    name: str = Field(description="The model's name.")
    platform: str = Field(description="What runs it, as in the model's metadata.")
    max_batch_size: int = Field(description="0: a request's tensors have no batch dimension.")
    input: list[TensorConfiguration] = Field(description="What an infer request sends.")
    output: list[TensorConfiguration] = Field(description="What an infer answer may hold.")


class ServerMetadata(BaseModel):
    """The server as the protocol describes it."""

    name: str = Field(description="medserve.")
    version: str = Field(description="medserve's version.")
    extensions: list[str] = Field(description="The protocol's extensions it speaks.")


@dataclass(frozen=True)
class InputTensor:
    """One input of an infer request, as sent: its data either ``raw`` (binary data, little-endian) or ``values`` (a
    sequence of numbers: JSON data, or gRPC's typed contents)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None
    values: Any = None


@dataclass(frozen=True)
class RequestedOutput:
    """An output an infer request names, with its parameters."""

    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputTensor:
    """One output of an infer answer: an array, or for BYTES a list of strings."""

    name: str
    datatype: str
    shape: list[int]
    value: Any
    parameters: Mapping[str, Any] = field(default_factory=dict)  # what the request asked of it


class DataPlane:
    """The protocol's work for one ingress replica, built once with it (``Services.of``): server and model metadata,
    readiness, model configuration and inference, each model call through the gatekeeper with its ``caller``.

    Args:
        gatekeeper: the replica's gatekeeper (API key, model rights, quotas, audit).
        repository: the models the application was built with.
        segmentation: the models' service, which runs each inference as it runs a study.
    """

    def __init__(self, gatekeeper: Gatekeeper, repository: ModelRepository, segmentation: SegmentationService):
        self.gatekeeper = gatekeeper
        self.repository = repository
        self.tensors = TensorSegmentation(segmentation)

    @staticmethod
    def server_metadata() -> ServerMetadata:
        """The server's name, version and the protocol extensions it speaks."""
        try:
            medserve_version = version("medserve")
        except PackageNotFoundError:
            medserve_version = "unknown"
        return ServerMetadata(name="medserve", version=medserve_version, extensions=EXTENSIONS)

    async def server_ready(self) -> bool:
        """Whether every deployment answers."""
        return await self.tensors.ready()

    async def model_metadata(self, caller: Caller, name: str, model_version: str | None) -> ModelMetadata:
        """The model's versions (every one served, or the one asked for), inputs and outputs; 404 for an unknown
        model or version, 422 for a model that does not segment volumes."""
        async with self.gatekeeper.visit(caller, "models", model=name, version=model_version):
            if model_version is None:
                spec = self.repository.get(name)
                versions = [served.version for served in self.repository.versions(name)]
            else:
                spec = self.repository.get(name, model_version)
                versions = [spec.version]
            signature = self.tensors.signature(spec)
            return ModelMetadata(
                name=spec.name,
                versions=versions,
                platform="medserve_segmentation",
                inputs=[_tensor_metadata(t, ACCEPTED[t.name][0]) for t in signature.inputs],
                outputs=[_tensor_metadata(t) for t in signature.outputs],
            )

    async def model_ready(self, caller: Caller, name: str, model_version: str | None) -> bool:
        """Whether the model (its newest version, or the one asked for) and the stages it uses answer; 404 for an
        unknown model or version, 422 for a model that does not segment volumes."""
        async with self.gatekeeper.visit(caller, "models", model=name, version=model_version):
            spec = self.repository.get(name, model_version)
            self.tensors.signature(spec)
            return await self.tensors.model_ready(spec)

    async def model_configuration(self, caller: Caller, name: str, model_version: str | None) -> ModelConfiguration:
        """The model's metadata in the shape of Triton's model configuration; the same refusals as
        ``model_metadata``."""
        metadata = await self.model_metadata(caller, name, model_version)

        def configured(tensor: TensorMetadata) -> TensorConfiguration:
            data_type = "TYPE_STRING" if tensor.datatype == BYTES else f"TYPE_{tensor.datatype}"
            return TensorConfiguration(name=tensor.name, data_type=data_type, dims=tensor.shape)

        return ModelConfiguration(
            name=metadata.name,
            platform=metadata.platform,
            max_batch_size=0,
            input=[configured(t) for t in metadata.inputs],
            output=[configured(t) for t in metadata.outputs],
        )

    async def infer(
        self,
        caller: Caller,
        name: str,
        model_version: str | None,
        stat: bool,
        read: ReadVolume,
        result_path: Callable[[str], str],
        answer: Callable[[VolumeSegmentation], Answer],
    ) -> Answer:
        """Segment the volume ``read`` brings (within the request's upload budget) as a study is, once the
        gatekeeper has let the request in and counted it against its tenant's quotas; ``answer`` turns the
        segmentation into the transport's answer inside the request's visit, so that its refusals (an unknown output)
        are audited too. ``result_path``: the path of a result's routes, from its id."""
        visiting = self.gatekeeper.visit(caller, "infer", model=name, version=model_version, stat=stat, admit=True)
        async with visiting as visit:
            segmented = await self.tensors.segment(visit, name, read, result_path(visit.request_id))
            metrics.observe_segment(caller, name, segmented.answer.timings_ms.model_dump())
            return answer(segmented)

    def outputs_of(
        self, segmented: VolumeSegmentation, requested: Sequence[RequestedOutput] | None
    ) -> list[OutputTensor]:
        """The outputs asked for (all of them, in ``OUTPUT_NAMES``' order, when none is named); 400 for an unknown
        one, or one asked of an extension medserve does not speak."""
        values = {
            "MASK": segmented.mask[np.newaxis],
            "LABEL_VALUES": segmented.label_values,
            "LABEL_NAMES": segmented.label_names,
            "LABEL_VOLUMES_ML": segmented.label_volumes_ml,
        }
        answer = segmented.answer
        spec = self.tensors.segmentation.repository.get(answer.model.name, answer.model.version)
        specs = {t.name: t for t in self.tensors.signature(spec).outputs}
        outputs = []
        for output in requested if requested is not None else [RequestedOutput(name) for name in OUTPUT_NAMES]:
            if output.name not in values:
                raise InvalidTensor(f"the outputs are {', '.join(OUTPUT_NAMES)}; there is no {output.name[:64]!r}")
            if "classification" in output.parameters:
                raise InvalidTensor("the classification extension is not supported: ask for the outputs themselves")
            datatype, value = _datatype_of(specs[output.name]), values[output.name]
            shape = [len(value)] if datatype == BYTES else list(value.shape)
            outputs.append(OutputTensor(output.name, datatype, shape, value, output.parameters))
        return outputs


def volume_of(inputs: Sequence[InputTensor]) -> VolumeTensors:
    """The IMAGE and AFFINE of a request's inputs, each checked against what the model takes."""
    names = [tensor.name for tensor in inputs]
    if sorted(names) != sorted(ACCEPTED):
        raise InvalidTensor(f"the inputs are {', '.join(ACCEPTED)}, each once; the request has {names[:8]}")
    arrays = {tensor.name: array_of(tensor) for tensor in inputs}
    image = arrays["IMAGE"]
    if image.ndim != 4 or image.shape[0] != 1:
        raise InvalidTensor(f"IMAGE has shape {list(image.shape)}; one volume [1, I, J, K] is taken")
    if arrays["AFFINE"].shape != (4, 4):
        raise InvalidTensor(f"AFFINE has shape {list(arrays['AFFINE'].shape)}; [4, 4] is taken")
    return VolumeTensors(image=image[0], affine=arrays["AFFINE"].astype(np.float64))


def array_of(tensor: InputTensor) -> np.ndarray:
    """One input's array, from its raw data or its values; 400 for a datatype the input is not sent as, or data of
    another size than its shape's."""
    accepted = ACCEPTED.get(tensor.name, ())
    if tensor.datatype not in accepted:
        raise InvalidTensor(f"{tensor.name} is sent as {' or '.join(accepted)}, not {tensor.datatype[:16]}")
    dtype, shape = DTYPES[tensor.datatype], tuple(tensor.shape)
    if any(n < 0 for n in shape):
        raise InvalidTensor(f"{tensor.name}'s shape {list(shape)} has a negative dimension")
    count = int(np.prod(shape, dtype=np.int64))
    if tensor.raw is not None:
        if tensor.values is not None:
            raise InvalidTensor(f"{tensor.name} has both typed (or JSON) data and binary data")
        if len(tensor.raw) != count * dtype.itemsize:
            raise InvalidTensor(
                f"{tensor.name} has {len(tensor.raw)} bytes of binary data; its shape and datatype need "
                f"{count * dtype.itemsize}"
            )
        return np.frombuffer(tensor.raw, dtype=dtype).reshape(shape)
    if tensor.values is None:
        raise InvalidTensor(f"{tensor.name} has no data")
    try:
        array = np.asarray(tensor.values, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise InvalidTensor(f"{tensor.name}'s data are not {tensor.datatype} numbers") from None
    if array.size != count:
        raise InvalidTensor(f"{tensor.name} has {array.size} elements of data for shape {list(shape)}")
    return array.reshape(shape)


def raw_data(output: OutputTensor) -> bytes | memoryview:
    """An output as binary data: its elements little-endian, or for BYTES each one's length and bytes."""
    if output.datatype == BYTES:
        return bytes_data(output.value)
    return np.ascontiguousarray(output.value, DTYPES[output.datatype]).data.cast("B")


def bytes_data(strings: list[str]) -> bytes:
    """BYTES elements as binary data: each one's length (4 bytes, little-endian), then it."""
    encoded = [s.encode() for s in strings]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def _tensor_metadata(tensor: TensorSpec, datatype: str | None = None) -> TensorMetadata:
    return TensorMetadata(name=tensor.name, datatype=datatype or _datatype_of(tensor), shape=list(tensor.shape))


def _datatype_of(tensor: TensorSpec) -> str:
    if tensor.dtype is None:
        return BYTES
    return next(name for name, dtype in DTYPES.items() if dtype == tensor.dtype.newbyteorder("<"))
