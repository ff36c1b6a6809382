"""``TensorSegmentation``: a segmentation model called with tensors (a volume's voxels and its affine) instead of a
study's files, apart from any protocol.

What a caller of a tensor protocol (the Open Inference Protocol's HTTP routes, ``serve_app.api.v2``) gets is what a
study's sender gets: the volume is written as a NIfTI image into the request's upload folder and goes through
``SegmentationService.segment`` (the same preprocessing, model and postprocessing, the processing slot, the deadline,
the result kept and audited); the answer adds the whole mask on the volume's grid as an array.

The tensors' meaning (``signature``):

inputs   IMAGE   float32 or int16, (1, I, J, K): the voxels in NIfTI's axis order, as nibabel reads a file
         AFFINE  float64 (4, 4): voxel index (i, j, k, 1) -> RAS millimetres, NIfTI's and MONAI's convention
outputs  MASK              uint8 (1, I, J, K): the labels on the input's grid (0: background)
         LABEL_VALUES      uint8 (N,): the model's foreground labels, as they appear in MASK
         LABEL_NAMES       bytes (N,): their names in the model's model.yaml
         LABEL_VOLUMES_ML  float64 (N,): each label's volume in millilitres, on the input's grid
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from serve_app.errors import InvalidTensor, ModelTaskMismatch
from serve_app.model_spec import ModelSpec
from serve_app.segmentation.responses import SegmentResponse
from serve_app.segmentation.service import SegmentationService
from serve_app.studies.checks import check_affine, check_finite_voxels
from serve_app.studies.upload import UploadBudget
from serve_app.studies.volume import Volume
from serve_app.tenancy.gatekeeper import Visit

__all__ = [
    "IMAGE_DTYPES",
    "ReadVolume",
    "TensorSegmentation",
    "TensorSpec",
    "VolumeSegmentation",
    "VolumeSignature",
    "VolumeTensors",
]

IMAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.int16))
"""What an IMAGE's voxels may be: float32 (any modality), int16 (CT in HU, half the bytes)."""
# The volume in the request's upload folder: uncompressed, written and read at disk speed (the study readers tell
# NIfTI by its bytes, not by this name).
_VOLUME_FILE = "volume.nii"
# How long a readiness check waits for every stage's replicas to answer.
_READY_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a model: its name, element type and shape (-1: any length)."""

    name: str
    dtype: np.dtype | None  # None: variable-length byte strings
    shape: tuple[int, ...]


@dataclass(frozen=True)
class VolumeSignature:
    """A segmentation model's tensors, for a protocol's model metadata."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class VolumeTensors:
    """A request's input: a volume's (I, J, K) voxels and its voxel -> RAS mm affine."""

    image: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class VolumeSegmentation:
    """A segmented volume: the answer a study's sender gets, and the whole mask on the volume's grid."""

    answer: SegmentResponse
    mask: np.ndarray  # (I, J, K) uint8
    label_values: np.ndarray  # (N,) uint8: the model's foreground labels
    label_names: list[str]
    label_volumes_ml: np.ndarray  # (N,) float64, in label_values' order


# How a protocol brings a request's tensors, read within the request's upload budget.
ReadVolume = Callable[[UploadBudget], Awaitable[VolumeTensors]]


class TensorSegmentation:
    """The segmentation models of one application, called with tensors.

    Args:
        segmentation: the models' service, which runs each request as it runs a study (its study reader holds a
            volume to the server's ``limits.max_volume_voxels``).
    """

    def __init__(self, segmentation: SegmentationService):
        self.segmentation = segmentation

    def signature(self, spec: ModelSpec) -> VolumeSignature:
        """The model's tensors (see the module's docstring); ``ModelTaskMismatch`` (422) for a model that does not
        segment volumes."""
        _check_task(spec)
        labels = len(spec.foreground_labels)
        return VolumeSignature(
            inputs=(
                TensorSpec("IMAGE", np.dtype(np.float32), (1, -1, -1, -1)),
                TensorSpec("AFFINE", np.dtype(np.float64), (4, 4)),
            ),
            outputs=(
                TensorSpec("MASK", np.dtype(np.uint8), (1, -1, -1, -1)),
                TensorSpec("LABEL_VALUES", np.dtype(np.uint8), (labels,)),
                TensorSpec("LABEL_NAMES", None, (labels,)),
                TensorSpec("LABEL_VOLUMES_ML", np.dtype(np.float64), (labels,)),
            ),
        )

    async def ready(self) -> bool:
        """Whether every stage's deployment answers."""
        try:
            await asyncio.wait_for(self.segmentation.ready(), timeout=_READY_TIMEOUT_S)
        except Exception:
            return False
        return True

    async def model_ready(self, spec: ModelSpec) -> bool:
        """Whether the model's own deployment and the shared stages answer."""
        stages = self.segmentation.stages
        handles = [stages.model_handles.get(spec.key), stages.preprocess, stages.postprocess]
        try:
            calls = [h.ready.remote() for h in handles if h is not None]
            await asyncio.wait_for(asyncio.gather(*calls), timeout=_READY_TIMEOUT_S)
        except Exception:
            return False
        return spec.key in stages.model_handles

    async def segment(self, visit: Visit, model: str, read: ReadVolume, result_path: str) -> VolumeSegmentation:
        """The volume ``read`` brings, segmented by ``model`` (the version the visit names) as a study would be, and
        kept as result ``visit.request_id``.

        Raises ``InvalidTensor`` (400) for voxels of another type or dimension, ``InvalidStudy`` (422) for non-finite
        voxels or a degenerate affine, ``PayloadTooLarge`` (413) past the upload or voxel limits, and whatever
        ``SegmentationService.segment`` raises.
        """
        spec = self.segmentation.repository.get(model, visit.model_version)
        _check_task(spec)

        async def receive(folder: Path, budget: UploadBudget) -> int:
            volume = await read(budget)
            # In a thread: a full-size volume takes a moment to check and write, which the ingress's loop must not.
            await asyncio.to_thread(_write_volume, volume, folder / _VOLUME_FILE)
            return budget.bytes

        answer = await self.segmentation.segment(visit, model, receive, result_path)
        mask = await asyncio.to_thread(self._whole_mask, answer.result_id, visit.tenant_id)
        measured = {label.label: label.volume_ml for label in answer.labels}
        values = spec.foreground_labels
        return VolumeSegmentation(
            answer=answer,
            mask=mask,
            label_values=np.asarray(values, dtype=np.uint8),
            label_names=[spec.labels[k].name for k in values],
            label_volumes_ml=np.asarray([measured.get(k, 0.0) for k in values], dtype=np.float64),
        )

    def _whole_mask(self, result_id: str, tenant_id: str) -> np.ndarray:
        path = self.segmentation.results.mask_path(result_id, tenant_id)
        return np.asanyarray(nib.load(path).dataobj).astype(np.uint8, copy=False)


def _write_volume(volume: VolumeTensors, path: Path) -> None:
    """The volume written as a NIfTI image, once checked as a study's reader would check it, naming the inputs."""
    image, affine = volume.image, volume.affine
    if image.ndim != 3 or min(image.shape) < 1:
        raise InvalidTensor(f"IMAGE has shape {list(image.shape)}; one 3D volume (1, I, J, K) is needed")
    if image.dtype not in IMAGE_DTYPES:
        raise InvalidTensor(f"IMAGE's voxels are {image.dtype}; float32 or int16 are taken")
    if affine.shape != (4, 4):
        raise InvalidTensor(f"AFFINE has shape {list(affine.shape)}; (4, 4) is needed")
    check_affine(affine, "the AFFINE input")
    check_finite_voxels(image, "the IMAGE input")
    Volume(image, affine).save_nifti(path)


def _check_task(spec: ModelSpec) -> None:
    if spec.task != "segmentation":
        raise ModelTaskMismatch(f"model {spec.name} is a {spec.task} model: send its slides as a WSI job")
