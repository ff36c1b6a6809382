"""The three stages of a segmentation request as plain objects on one device (the order they run in:
``serve_app.segmentation.stage_order``).

The split layout wraps each stage in its own deployment (host arrays between them); the fused layout
runs all three in one replica, where tensors stay on its GPU. Same code, same results.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer

from serve_app.config import LimitsConfig
from serve_app.engines import load_engine
from serve_app.engines.devices import to_device
from serve_app.errors import InvalidStudy
from serve_app.model_repository import ModelSpec
from serve_app.observability.input_drift import InputMonitor
from serve_app.results import ResultStore
from serve_app.results.measurements import LabelVolume
from serve_app.segmentation.messages import Array, Grid, Prediction, PreparedStudy
from serve_app.segmentation.transforms import label_volumes_ml, mask_on_grid, to_model_input
from serve_app.stopwatch import Stopwatch
from serve_app.studies.header_processes import HeaderProcesses
from serve_app.studies.reader import read_study
from serve_app.studies.volume import Affine, voxel_volume_ml

__all__ = ["Postprocessor", "Predictor", "Preprocessor"]


class Preprocessor:
    """Reads an upload folder into the model's input on ``device``.

    Args:
        limits: the server's limits on what an upload may hold.
        device: where the model's input is made (the replica's GPU, or the CPU).
        header_processes: processes that parse a DICOM series' headers (started here); 0: none, parsed in-process.
        monitor: where each study read is recorded for input monitoring (``serve_app.observability.input_drift``);
            None: nowhere.
    """

    def __init__(
        self,
        limits: LimitsConfig,
        device: torch.device,
        *,
        header_processes: int = 0,
        monitor: InputMonitor | None = None,
    ):
        self.limits, self.device, self.monitor = limits, device, monitor
        self.parsers = HeaderProcesses(header_processes) if header_processes else None
        if self.parsers is not None:
            self.parsers.warm_up()

    def __call__(self, upload_folder: Path, spec: ModelSpec, image_path: Path | None = None) -> PreparedStudy:
        """The study in ``upload_folder`` as ``spec``'s model input: (C_in, *model_spatial) on this device.

        With ``image_path``, the study's image (I, J, K) is also written there as gzipped NIfTI, on the grid and
        with the affine the mask will have (``ResultStore.keep_image`` keeps it with the result, for a viewer).
        Raises ``InvalidStudy`` (422) when the study's modality is not the model's.
        """
        volume = read_study(Path(upload_folder), self.limits, self.parsers)
        if volume.modality and volume.modality != spec.modality:
            raise InvalidStudy(f"the series is {volume.modality}; model {spec.name} takes {spec.modality}")
        if self.monitor is not None:
            self.monitor.observe_study(spec.name, spec.version, spec.folder, volume)
        if image_path is not None:
            volume.save_nifti(Path(image_path))
        image = to_model_input(volume, spec.preprocessing, self.device)
        return PreparedStudy(
            image=image.as_tensor(),
            model_affine=np.asarray(image.affine, dtype=np.float64),
            grid=Grid(shape=volume.shape, affine=volume.affine, source=volume.source),
            study_instance_uid=volume.study_instance_uid,
        )


class Predictor:
    """Runs a model's engine on batches of model inputs, whole volumes or by sliding window.

    Args:
        spec: the model; ``spec.preprocessing.roi_size`` chooses sliding-window inference, with
            ``spec.inference``'s window batch size and overlap.
        device: where the engine runs.
    """

    def __init__(self, spec: ModelSpec, device: torch.device):
        self.engine = load_engine(spec, device)
        roi = spec.preprocessing.roi_size
        window = spec.inference
        self.inferer = (
            SlidingWindowInferer(roi_size=roi, sw_batch_size=window.sw_batch_size, overlap=window.overlap)
            if roi
            else SimpleInferer()
        )
        self.input_item_shape = spec.input_item_shape
        self._warm_batch_sizes: set[int] = set()

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def warm_up(self, max_batch_size: int) -> None:
        """Run every batch size up to ``max_batch_size`` once on a GPU, so that cuDNN's algorithm search and the
        CUDA graphs' capture, hundreds of milliseconds for each new shape, happen before traffic rather than to
        the first requests that make a batch of that size (they were the closed-loop p99's tail)."""
        if self.device.type != "cuda":
            return
        for size in sorted(set(range(1, max_batch_size + 1)) - self._warm_batch_sizes):
            self([torch.zeros(self.input_item_shape, device=self.device)] * size)
            self._warm_batch_sizes.add(size)
        torch.cuda.synchronize(self.device)

    def __call__(self, images: Sequence[Array]) -> list[torch.Tensor]:
        """Logits (C_out, *model_spatial) on this device for each (C_in, *model_spatial) image.

        Images of one shape are stacked into one batch; whole-volume models see one shape.
        """
        logits: list[torch.Tensor] = [None] * len(images)
        by_shape = defaultdict(list)
        for i, image in enumerate(images):
            by_shape[tuple(image.shape)].append(i)
        with torch.inference_mode():
            for indices in by_shape.values():
                batch = torch.stack([_on_device(images[i], self.device) for i in indices])
                for i, row in zip(indices, self.inferer(batch, self.engine), strict=True):
                    logits[i] = row
        return logits

    def predict(self, images: Sequence[Array]) -> list[Prediction]:
        """``__call__``, timed: each ``Prediction`` carries the batch's size and compute seconds."""
        watch = Stopwatch()
        logits = self(images)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so that compute time is compute, not kernel launches
        compute_s = watch.total_s
        return [Prediction(logits=x, batch_size=len(images), compute_s=compute_s) for x in logits]


class Postprocessor:
    """Turns logits on the model's grid into a mask on the study's grid, stores it, and measures its labels.

    Args:
        results: where the mask is stored, under the request's result id.
    """

    def __init__(self, results: ResultStore):
        self.results = results

    def __call__(
        self, logits: Array, model_affine: Affine, grid: Grid, spec: ModelSpec, result_id: str
    ) -> list[LabelVolume]:
        """Stores the mask under ``result_id``; returns each foreground label's volume.

        Args:
            logits: (C_out, *model_spatial) on the model's grid, on any device.
            model_affine: model voxel -> RAS mm.
            grid: the study's grid (image voxel -> RAS mm), which the mask is made on; its DICOM source is stored
                with the result, for the DICOM SEG and SR.
            spec: the model, for its labels; stored with the result.
            result_id: the result's id in the store.
        """
        if not isinstance(logits, torch.Tensor):
            logits = to_device(logits, torch.device("cpu"))
        mask = mask_on_grid(logits, model_affine, grid.affine, grid.shape, spec.foreground_labels)
        volumes = label_volumes_ml(mask.labels, spec.foreground_labels, voxel_volume_ml(grid.affine))
        labels = [LabelVolume(label=k, name=spec.labels[k].name, volume_ml=ml) for k, ml in volumes.items()]
        summary = {"labels": [label.model_dump() for label in labels]}
        box = mask.labels.cpu().numpy()
        self.results.save(result_id, box, mask.start, grid.shape, grid.affine, summary, spec, grid.source)
        return labels


def _on_device(image: Array, device: torch.device) -> torch.Tensor:
    return image.to(device) if isinstance(image, torch.Tensor) else to_device(image, device)
