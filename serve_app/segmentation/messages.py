"""What crosses a deployment boundary: CPU numpy arrays and plain fields, never CUDA tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Grid:
    """The original image's voxel grid, which the mask is returned on."""

    shape: tuple[int, int, int]
    affine: np.ndarray


@dataclass
class PreparedStudy:
    image: np.ndarray  # (C, *spatial) float32, the model's input
    image_affine: np.ndarray  # where the model's grid lies, to resample the mask back
    grid: Grid
    study_instance_uid: Optional[str]
    preprocess_s: float


@dataclass
class Prediction:
    logits: np.ndarray  # (C_out, *spatial) float32
    batch_size: int
    compute_s: float


@dataclass
class Segmentation:
    """A finished request, whichever layout ran it."""

    grid: Grid
    labels: list[dict]  # {"label", "name", "volume_ml"} per foreground label
    batch_size: int
    study_instance_uid: Optional[str]
    timings_s: dict[str, float]  # preprocess, model_queue, model, postprocess
