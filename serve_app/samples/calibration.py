"""Sample volumes for TensorRT's int8 calibration: synthetic CT phantoms, preprocessed as a model sees them."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import ResizeWithPadOrCrop

from serve_app.engines.onnx_export import input_shape
from serve_app.model_spec import ModelSpec
from serve_app.samples.phantoms import ct_phantom
from serve_app.segmentation.transforms import to_model_input

__all__ = ["CALIBRATION_BATCH_SIZE", "CALIBRATION_VOLUMES", "calibration_batches"]

CALIBRATION_VOLUMES = 16
CALIBRATION_BATCH_SIZE = 4  # divides CALIBRATION_VOLUMES: every calibration batch has the calibration profile's shape


def calibration_batches(spec: ModelSpec, device: torch.device | str) -> list[torch.Tensor]:
    """``CALIBRATION_VOLUMES`` phantoms as ``CALIBRATION_BATCH_SIZE``-volume batches on ``device``: each
    (CALIBRATION_BATCH_SIZE, 1, *grid) float32, ``grid`` the model's input grid (its ROI for a sliding window)."""
    if spec.modality != "CT":
        raise ValueError(f"int8 calibrates on CT phantoms; model {spec.name} is {spec.modality}: use precision fp16")
    fit = ResizeWithPadOrCrop(input_shape(spec, 1)[2:])  # a sliding-window model sees ROI-sized patches
    # Fixed seeds: every node calibrates on the same volumes, so a cache key needs no calibration data in it.
    volumes = [
        fit(to_model_input(ct_phantom(np.random.default_rng(20_000 + i)).volume, spec.preprocessing)).as_tensor()
        for i in range(CALIBRATION_VOLUMES)
    ]
    stacked = torch.stack(volumes).to(device, torch.float32)
    return list(stacked.split(CALIBRATION_BATCH_SIZE))
