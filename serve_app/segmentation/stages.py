"""The three stages as plain objects on one device.

The split layout wraps each in its own deployment (CPU arrays between them); the fused layout
runs all three in one replica, where tensors stay on its GPU. Same code, same results.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer, SlidingWindowInferer

from serve_app.config import LimitsConfig
from serve_app.engines.devices import to_device
from serve_app.engines import load_engine
from serve_app.errors import InvalidStudy
from serve_app.segmentation.messages import Grid
from serve_app.model_repository import ModelSpec
from serve_app.studies.reader import read_study
from serve_app.results import ResultStore
from serve_app.segmentation.transforms import label_volumes_ml, mask_on_grid, to_model_input
from serve_app.studies.volume import Volume, voxel_volume_ml


class Preprocessor:
    def __init__(self, limits: LimitsConfig, device: torch.device):
        self.limits, self.device = limits, device

    def __call__(self, upload_folder: Path, spec: ModelSpec) -> tuple[MetaTensor, Volume]:
        """The model's input on this device, and the study it came from (its grid, its UID)."""
        volume = read_study(Path(upload_folder), self.limits)
        if volume.modality and volume.modality != spec.modality:
            raise InvalidStudy(f"the series is {volume.modality}; model {spec.name} takes {spec.modality}")
        return to_model_input(volume, spec.preprocessing, self.device), volume


class Predictor:
    def __init__(self, spec: ModelSpec, device: torch.device):
        self.engine = load_engine(spec, device)
        roi = spec.preprocessing.roi_size
        self.inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=4, overlap=0.25) if roi else SimpleInferer()

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits for each (C, *spatial) image, batched; whole-volume models see one shape."""
        logits: list[torch.Tensor] = [None] * len(images)
        by_shape = defaultdict(list)
        for i, image in enumerate(images):
            by_shape[tuple(image.shape)].append(i)
        with torch.inference_mode():
            for indices in by_shape.values():
                batch = torch.stack([_as_tensor(images[i], self.device) for i in indices])
                for i, row in zip(indices, self.inferer(batch, self.engine)):
                    logits[i] = row
        return logits


def _as_tensor(image, device: torch.device) -> torch.Tensor:
    return image.to(device) if isinstance(image, torch.Tensor) else to_device(image, device)


class Postprocessor:
    def __init__(self, results: ResultStore):
        self.results = results

    def __call__(self, logits: torch.Tensor, model_affine, grid: Grid, spec: ModelSpec, result_id: str) -> list[dict]:
        """Writes the mask on the study's grid; returns each foreground label's volume."""
        mask = mask_on_grid(logits, model_affine, grid.affine, grid.shape, spec.foreground_labels)
        volumes = label_volumes_ml(mask.labels, spec.foreground_labels, voxel_volume_ml(grid.affine))
        labels = [{"label": k, "name": spec.labels[k], "volume_ml": ml} for k, ml in volumes.items()]
        self.results.save(result_id, mask.labels.cpu().numpy(), mask.start, grid.shape, grid.affine, {"labels": labels})
        return labels


class Stopwatch:
    """Seconds since the last lap, by name."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now
