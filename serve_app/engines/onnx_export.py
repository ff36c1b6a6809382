"""ONNX export of a model's network, checked against torch through onnxruntime before it is used.

Exports go into an engine cache, never into the model's folder: an installed package's folder
may be read-only, and one folder is shared by every replica. The cache is ``$MEDSERVE_ENGINE_CACHE``,
else ``engine-cache/`` under the default ``storage.root``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from serve_app.config import StorageConfig
from serve_app.engines.torch_engine import build_network
from serve_app.model_spec import ModelSpec, WeightsFormat

OPSET = 18
FP32_TOLERANCE = 1e-3
# 1 is the smallest batch and 3 is not the export's example batch: both prove the batch axis is dynamic.
CHECK_BATCH_SIZES = (1, 3)


class OnnxCheckFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class OnnxCheck:
    max_abs_diff: float
    tolerance: float
    batch_sizes: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"onnxruntime vs torch on random batches of {', '.join(map(str, self.batch_sizes))}: "
            f"max abs difference {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}) {verdict}"
        )


def engine_cache_root() -> Path:
    return Path(os.environ.get("MEDSERVE_ENGINE_CACHE") or StorageConfig().root / "engine-cache")


def cached_onnx_path(spec: ModelSpec) -> Path:
    # Keyed by the weights' bytes: new weights under an unchanged name and version never reuse a stale export.
    digest = hashlib.sha256(spec.weights_path.read_bytes()).hexdigest()[:16]
    return engine_cache_root() / spec.name / f"{spec.version}-{digest}" / spec.engine.onnx_file


def onnx_for(spec: ModelSpec) -> Path:
    """The model's ONNX: its weights, or a file shipped beside them, else exported once into the cache."""
    if spec.weights.format is WeightsFormat.onnx:
        return spec.weights_path
    shipped = spec.folder / spec.engine.onnx_file
    if shipped.is_file():
        return shipped
    cached = cached_onnx_path(spec)
    if not cached.is_file():
        export_checked(spec, cached)
    return cached


def input_shape(spec: ModelSpec, batch_size: int) -> tuple[int, ...]:
    return (batch_size, *spec.input_item_shape)


def export_checked(spec: ModelSpec, out: Path, tolerance: float = FP32_TOLERANCE) -> OnnxCheck:
    """Export to ``out`` only if onnxruntime matches torch within ``tolerance``; else raise ``OnnxCheckFailed``."""
    network = build_network(spec).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: replicas exporting at once never read a half-written file.
    partial = out.with_name(f".{out.stem}.{os.getpid()}.partial.onnx")
    try:
        export(network, input_shape(spec, 2), partial)
        check = compare_with_torch(network, partial, input_shape(spec, 1), tolerance)
        if not check.ok:
            raise OnnxCheckFailed(str(check))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return check


def export(network: torch.nn.Module, example_shape: tuple[int, ...], out: Path) -> None:
    """The network to ONNX with a dynamic batch axis.

    The dynamo exporter (torch.export) handles MONAI's UNet; the legacy TorchScript one does too
    but is deprecated. The example batch is 2 because torch.export specialises an axis it sees as 1.
    """
    torch.onnx.export(
        network,
        (torch.rand(example_shape),),
        out,
        input_names=["image"],
        output_names=["logits"],
        opset_version=OPSET,
        dynamo=True,
        external_data=False,  # one self-contained file: hashed for the TensorRT cache, parsed from bytes
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        verbose=False,
    )


def compare_with_torch(
    network: torch.nn.Module, onnx_path: Path, sample_shape: tuple[int, ...], tolerance: float
) -> OnnxCheck:
    """The ONNX file (structurally valid per onnx.checker) run by onnxruntime on CPU against ``network``."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(onnx_path), full_check=True)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in CHECK_BATCH_SIZES:
        # Uniform in [0, 1]: the range preprocessing's intensity window maps images onto.
        batch = torch.rand((n, *sample_shape[1:]), generator=generator)
        with torch.inference_mode():
            expected = network(batch).float().numpy()
        actual = session.run(None, {input_name: batch.numpy()})[0]
        worst = max(worst, float(np.abs(actual - expected).max()))
    return OnnxCheck(worst, tolerance, CHECK_BATCH_SIZES)
