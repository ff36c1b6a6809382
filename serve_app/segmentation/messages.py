"""What flows between the stages of a segmentation request, in either layout.

In the fused layout these carry torch tensors on the replica's device. Whatever crosses a deployment
boundary (the split layout) is first moved to the host with ``to_host()``: a replica without a GPU that
receives a CUDA tensor dies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel

from serve_app.results.measurements import LabelVolume
from serve_app.studies.dicom_source import DicomSource
from serve_app.studies.volume import Affine

__all__ = ["Grid", "Prediction", "PreparedStudy", "Segmentation", "StageTimings"]

Array = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class Grid:
    """The study's own voxel grid, which the mask is returned on."""

    shape: tuple[int, int, int]  # (I, J, K)
    affine: Affine  # image voxel -> RAS mm
    # The DICOM instances of the grid's slices (a DICOM SEG references them); None for a NIfTI study.
    source: DicomSource | None = None


@dataclass
class PreparedStudy:
    """The preprocessor's output: the model's input and where it lies."""

    image: Array  # (C_in, *model_spatial) float32
    model_affine: Affine  # model voxel -> RAS mm: where the model's grid lies, to resample the mask back
    grid: Grid
    study_instance_uid: str | None  # for the audit trail's salted hash only; never logged as is

    def to_host(self) -> PreparedStudy:
        return dataclasses.replace(self, image=_on_host(self.image))


@dataclass
class Prediction:
    """One study's logits out of a model batch."""

    logits: Array  # (C_out, *model_spatial) float32
    batch_size: int  # studies in the batch that computed it
    compute_s: float  # the batch's compute time, without the wait for the batch to fill

    def to_host(self) -> Prediction:
        return dataclasses.replace(self, logits=_on_host(self.logits))


class StageTimings(BaseModel):
    """Seconds a request spent in each stage after its upload, as the caller that drives the stages waits on
    them: the same in both layouts (a handle's hop, or a thread's, counts to its stage)."""

    preprocess: float
    model_queue: float  # the model stage's wait for its batch to fill and run, and its hops
    model: float  # the batch's compute
    postprocess: float


@dataclass
class Segmentation:
    """A finished request, whichever layout ran it."""

    grid: Grid  # without its source: the caller learns only whether there was one
    labels: list[LabelVolume]
    batch_size: int
    study_instance_uid: str | None
    timings: StageTimings
    dicom_source: bool  # whether the study was DICOM: its result then has a DICOM SEG and SR


def _on_host(array: Array) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array
