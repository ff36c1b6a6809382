"""The model-specific image operations of preprocessing and postprocessing, built from MONAI.

The same functions run in training, in the split deployments and in a fused GPU replica:
they take and return torch tensors on whatever device the input is on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Activations,
    AsDiscrete,
    Compose,
    KeepLargestConnectedComponent,
    Orientation,
    Resize,
    ScaleIntensityRange,
    Spacing,
    SpatialResample,
)

from serve_app.model_repository import Preprocessing
from serve_app.volume import Volume


def preprocessing(spec: Preprocessing) -> Compose:
    """Channel-first image in modality units -> the model's input grid and intensity range."""
    steps = [Orientation(axcodes=spec.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if spec.target_spacing is not None:
        steps.append(Spacing(pixdim=spec.target_spacing, mode="bilinear"))
    window = spec.intensity_window
    steps.append(ScaleIntensityRange(window.a_min, window.a_max, window.b_min, window.b_max, clip=True))
    if spec.spatial_size is not None:
        steps.append(Resize(spatial_size=spec.spatial_size, mode="area"))
    return Compose(steps)


def as_image(volume: Volume, device: torch.device | str = "cpu") -> MetaTensor:
    """A channel-first MetaTensor carrying the volume's affine."""
    array = torch.as_tensor(volume.array, dtype=torch.float32, device=device)
    return MetaTensor(array[None], affine=torch.as_tensor(volume.affine, dtype=torch.float64))


def prepare(volume: Volume, spec: Preprocessing, device: torch.device | str = "cpu") -> MetaTensor:
    return preprocessing(spec)(as_image(volume, device))


def to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    return Activations(softmax=True, dim=0)(logits)


def to_labels(scores: torch.Tensor) -> torch.Tensor:
    """Channel-first logits or probabilities -> a one-channel label map."""
    return AsDiscrete(argmax=True)(scores)


def keep_largest_component(labels: torch.Tensor, foreground: Sequence[int]) -> torch.Tensor:
    """Drop every island of each foreground label but its largest (a segmented organ is one piece)."""
    return KeepLargestConnectedComponent(applied_labels=list(foreground), independent=True)(labels)


def resample_to_grid(image: torch.Tensor, src_affine, dst_affine, shape: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Channel-first image on the model's grid -> the same on the original image grid.

    Probabilities resampled (bilinear) before the argmax keep boundaries finer than the model's grid;
    on a coarse grid that is worth several points of Dice over resampling labels (nearest).
    """
    plain = image.as_tensor() if isinstance(image, MetaTensor) else image  # drop the trace of earlier transforms
    image = MetaTensor(plain, affine=torch.as_tensor(np.asarray(src_affine), dtype=torch.float64))
    out = SpatialResample(mode=mode, padding_mode="border", dtype=torch.float32)(
        image, dst_affine=torch.as_tensor(np.asarray(dst_affine), dtype=torch.float64), spatial_size=tuple(shape)
    )
    return out.as_tensor()


def mask_on_grid(logits: torch.Tensor, model_affine, grid_affine, grid_shape: Sequence[int], foreground: Sequence[int]) -> torch.Tensor:
    """The whole postprocessing of a segmentation: logits on the model's grid -> uint8 mask on the image's grid."""
    probabilities = resample_to_grid(to_probabilities(logits), model_affine, grid_affine, grid_shape)
    return keep_largest_component(to_labels(probabilities), foreground)[0].to(torch.uint8)


def label_volumes_ml(mask: torch.Tensor, labels: Sequence[int], voxel_ml: float) -> dict[int, float]:
    """Counted where the mask is: on a GPU this is milliseconds, where numpy's bincount of a
    512x512x300 mask on the host took 0.4 s (it widens every voxel to int64 first)."""
    counts = torch.bincount(mask.flatten(), minlength=max(labels) + 1).cpu()
    return {k: round(float(counts[k]) * voxel_ml, 3) for k in labels}