from __future__ import annotations

from typing import Protocol

import torch

from serve_app.model_spec import ModelSpec


class Engine(Protocol):
    """Runs a model's network on one device.

    ``__call__`` takes an (N, C_in, *spatial) float32 tensor on ``device`` and returns
    (N, C_out, *spatial) float32 logits on ``device``; N is one of ``spec.engine.batch_sizes``
    when the engine is wrapped in ``PaddedBatches`` (``load_engine`` does that).
    """

    device: torch.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class PaddedBatches:
    """Pads a batch up to the next configured size and drops the padding from the output.

    Fixed sizes let CUDA graphs, TensorRT profiles and cuDNN autotuning see a handful of shapes.
    """

    def __init__(self, engine: Engine, batch_sizes: tuple[int, ...]):
        self.engine, self.batch_sizes, self.device = engine, batch_sizes, engine.device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        if n > self.batch_sizes[-1]:
            return torch.cat([self(part) for part in batch.split(self.batch_sizes[-1])])
        size = next(s for s in self.batch_sizes if s >= n)
        if size > n:
            batch = torch.cat([batch, batch.new_zeros((size - n, *batch.shape[1:]))])
        return self.engine(batch)[:n]


def load_engine(spec: ModelSpec, device: torch.device | str) -> Engine:
    device = torch.device(device)
    backend = spec.engine.backend
    if backend == "torch":
        from serve_app.engines.torch_engine import TorchEngine

        engine = TorchEngine(spec, device)
    elif backend == "onnxruntime":
        from serve_app.engines.onnxruntime_engine import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(spec, device)
    else:
        from serve_app.engines.tensorrt_engine import TensorRTEngine

        engine = TensorRTEngine(spec, device)
    return PaddedBatches(engine, spec.engine.batch_sizes)
