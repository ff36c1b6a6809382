"""TensorRT 10: an engine built from the model's ONNX, cached on disk per GPU, version, precision and profile.

Written against the TensorRT 10 Python API. It has not run on a GPU: TensorRT cannot be installed
where this was written; the tests cover the cache key and the builder configuration against a
stand-in ``tensorrt`` module. TensorRT 11 removes BuilderFlag.FP16/INT8 and the int8 calibrator,
so another major version is refused rather than half-working.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from serve_app.engines.onnx_export import engine_cache_root, onnx_for
from serve_app.model_spec import ModelSpec

__all__ = ["TensorRTEngine", "build_plan", "cached_plan", "engine_cache_key", "tensorrt_module"]


def tensorrt_module():
    try:
        import tensorrt
    except ImportError:
        raise ImportError("backend tensorrt needs the tensorrt package: pip install 'medserve[tensorrt]'") from None
    if tensorrt.__version__.split(".")[0] != "10":
        raise ImportError(f"backend tensorrt is written for TensorRT 10; this is TensorRT {tensorrt.__version__}")
    return tensorrt


def engine_cache_key(
    gpu_name: str,
    compute_capability: tuple[int, int],
    tensorrt_version: str,
    precision: str,
    batch_sizes: Sequence[int],
    onnx_bytes: bytes,
) -> str:
    """A serialized engine runs only where all of these match the build (the ONNX fixes the other dims)."""
    fields = [
        gpu_name,
        list(compute_capability),
        tensorrt_version,
        precision,
        list(batch_sizes),
        hashlib.sha256(onnx_bytes).hexdigest(),
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]


class TensorRTEngine:
    def __init__(self, spec: ModelSpec, device: torch.device):
        trt = tensorrt_module()
        if device.type != "cuda":
            raise RuntimeError(f"backend tensorrt needs a CUDA device; model {spec.name} was given {device}")
        self.device = device
        plan_path = cached_plan(spec, device)
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)  # kept: the engine must not outlive its runtime
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan_path}")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._input = next(n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self._output = next(n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # fp16/int8 change the kernels inside; the network's I/O tensors stay float32 as exported.
        batch = batch.to(self.device, torch.float32).contiguous()
        self._context.set_input_shape(self._input, tuple(batch.shape))
        logits = torch.empty(
            tuple(self._context.get_tensor_shape(self._output)), dtype=torch.float32, device=self.device
        )
        self._context.set_tensor_address(self._input, batch.data_ptr())
        self._context.set_tensor_address(self._output, logits.data_ptr())
        # On the replica's current stream, so torch orders its own work on these tensors around it.
        if not self._context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return logits


def cached_plan(spec: ModelSpec, device: torch.device, calibration: list[torch.Tensor] | None = None) -> Path:
    """The model's serialized engine for ``device``'s kind of GPU, built into the engine cache if it is not there.

    An int8 engine is calibrated on ``calibration`` (device tensors of one shape, preprocessed as the model sees
    them in serving), which only its caller can make: a replica given none finds the plan built or fails, naming
    the command that builds it (``medserve build-tensorrt``).
    """
    trt = tensorrt_module()
    options = spec.engine
    onnx_bytes = onnx_for(spec).read_bytes()
    gpu = torch.cuda.get_device_properties(device)
    key = engine_cache_key(
        gpu.name, (gpu.major, gpu.minor), trt.__version__, options.precision, options.batch_sizes, onnx_bytes
    )
    plan_path = engine_cache_root() / "tensorrt" / f"{spec.name}-{key}.plan"
    if plan_path.is_file():
        return plan_path
    if options.precision == "int8" and calibration is None:
        raise RuntimeError(
            f"model {spec.name} runs TensorRT int8 and no engine for a {gpu.name} is built yet: build it first, on a "
            f"node with this GPU, with `medserve build-tensorrt {spec.name}`"
        )
    plan = build_plan(
        onnx_bytes, options.precision, options.batch_sizes, calibration, plan_path.with_suffix(".calibration")
    )
    _write_atomically(plan_path, plan)
    return plan_path


def build_plan(
    onnx_bytes: bytes,
    precision: str,
    batch_sizes: Sequence[int],
    calibration: list[torch.Tensor] | None = None,
    calibration_cache: Path | None = None,
) -> bytes:
    """A serialized engine for batches of ``batch_sizes[0]`` to ``batch_sizes[-1]`` volumes."""
    trt = tensorrt_module()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse the ONNX: {errors}")
    image = network.get_input(0)
    volume = tuple(image.shape)[1:]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    # Tuned for the largest batch: batches fill up under load, which is when speed matters.
    largest = (batch_sizes[-1], *volume)
    profile.set_shape(image.name, min=(batch_sizes[0], *volume), opt=largest, max=largest)
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # with int8: layers without int8 kernels fall back to fp16, not fp32
    if precision == "int8":
        # Implicit (calibrated) int8 is deprecated since TensorRT 10.1 in favour of explicit Q/DQ
        # quantization (e.g. NVIDIA ModelOpt) and removed in 11; it still works throughout 10.x.
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = entropy_calibrator(calibration, calibration_cache)
        calibration_profile = builder.create_optimization_profile()
        fixed = tuple(calibration[0].shape)
        calibration_profile.set_shape(image.name, min=fixed, opt=fixed, max=fixed)
        config.set_calibration_profile(calibration_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine; its log says why")
    return bytes(plan)


def entropy_calibrator(batches: list[torch.Tensor], cache_path: Path):
    """An ``IInt8EntropyCalibrator2`` feeding ``batches`` (device tensors of one shape) to the builder."""
    trt = tensorrt_module()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._pending = iter(batches)

        def get_batch_size(self) -> int:
            return batches[0].shape[0]

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._pending, None)
            return None if batch is None else [batch.data_ptr()]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            _write_atomically(cache_path, bytes(cache))

    return EntropyCalibrator()


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
