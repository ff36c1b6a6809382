"""A model repository: a folder with one sub-folder per model, each described by a ``model.yaml``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve_app.errors import ModelNotFound

SpatialSize = tuple[int, int, int]
Spacing = tuple[float, float, float]


class WeightsFormat(str, Enum):
    monai_state_dict = "monai_state_dict"  # a MONAI network spec + a torch state dict
    torchscript = "torchscript"
    onnx = "onnx"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class IntensityWindowSpec(_Strict):
    """``ScaleIntensityRange``: [a_min, a_max] (HU for CT) onto [b_min, b_max], clipped."""

    a_min: float
    a_max: float
    b_min: float = 0.0
    b_max: float = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> "IntensityWindowSpec":
        if self.a_max <= self.a_min:
            raise ValueError("a_max must be greater than a_min")
        return self


class PreprocessingSpec(_Strict):
    orientation: str = Field("RAS", pattern="^[LRAPSI]{3}$")
    target_spacing: Optional[Spacing] = None  # mm; None keeps the input's spacing
    intensity_window: IntensityWindowSpec
    # Exactly one of: a fixed size every volume is resized to (batches whole volumes),
    # or a sliding-window ROI (any volume size, patches batched).
    spatial_size: Optional[SpatialSize] = None
    roi_size: Optional[SpatialSize] = None

    @model_validator(mode="after")
    def _one_geometry(self) -> "PreprocessingSpec":
        if (self.spatial_size is None) == (self.roi_size is None):
            raise ValueError("give exactly one of spatial_size and roi_size")
        return self


class NetworkSpec(_Strict):
    """A network class of ``monai.networks.nets`` and its constructor arguments."""

    name: str
    args: dict[str, Any] = {}


class WeightsSpec(_Strict):
    file: str
    format: WeightsFormat


class EngineSpec(_Strict):
    """How the network runs. Options a backend cannot honour are ignored on it (fp16 on a CPU, say)."""

    backend: Literal["torch", "onnxruntime", "tensorrt"] = "torch"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"  # int8: TensorRT only, calibrated on sample volumes
    channels_last: bool = False  # torch on CUDA: channels-last-3d memory format
    cuda_graphs: bool = False  # torch on CUDA: replay one captured graph per padded batch size
    compile: bool = False  # torch: torch.compile the network
    # Batches are padded up to the next of these sizes, so engines, graphs and profiles see few shapes.
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    onnx_file: str = "model.onnx"  # onnxruntime / tensorrt: exported on first use when absent

    @model_validator(mode="after")
    def _sizes(self) -> "EngineSpec":
        if not self.batch_sizes or list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] < 1:
            raise ValueError("batch_sizes must be increasing positive integers")
        if self.precision == "int8" and self.backend != "tensorrt":
            raise ValueError("precision int8 needs backend tensorrt")
        return self


class ModelSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str
    task: Literal["segmentation"] = "segmentation"
    modality: Literal["CT", "MR"]
    description: str = ""
    labels: dict[int, str]
    preprocessing: PreprocessingSpec
    network: Optional[NetworkSpec] = None
    weights: WeightsSpec
    engine: EngineSpec = EngineSpec()
    # Filled in by the repository: the model's own folder.
    folder: Path = Path(".")

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        if self.labels.get(0) is None:
            raise ValueError("labels must name label 0 (background)")
        if self.weights.format is WeightsFormat.monai_state_dict and self.network is None:
            raise ValueError("weights.format monai_state_dict needs a network")
        return self

    @property
    def weights_path(self) -> Path:
        return self.folder / self.weights.file

    @property
    def foreground_labels(self) -> list[int]:
        return sorted(k for k in self.labels if k != 0)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "modality": self.modality,
            "description": self.description,
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
        }


class ModelRepositoryError(ValueError):
    """A model.yaml in the repository is missing or invalid."""


def read_model_spec(path: Path) -> ModelSpec:
    """One validated ``model.yaml``; its folder is where the weights are looked for."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
        return ModelSpec.model_validate({**raw, "folder": path.parent})
    except (yaml.YAMLError, TypeError) as e:
        raise ModelRepositoryError(f"{path}: not a YAML mapping ({e})") from None
    except ValidationError as e:
        fields = "\n".join(f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ModelRepositoryError(f"{path} is invalid:\n{fields}") from None


class ModelRepository:
    """The models of one repository folder, read and validated once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ModelRepositoryError(f"model repository {self.root} is not a folder")
        self._models = {spec.name: spec for spec in map(self._read, sorted(self.root.glob("*/model.yaml")))}
        if not self._models:
            raise ModelRepositoryError(f"model repository {self.root} holds no */model.yaml")

    @staticmethod
    def _read(path: Path) -> ModelSpec:
        spec = read_model_spec(path)
        if spec.name != path.parent.name:
            raise ModelRepositoryError(f"{path}: name {spec.name!r} differs from its folder {path.parent.name!r}")
        if not spec.weights_path.is_file():
            raise ModelRepositoryError(f"{path}: weights file {spec.weights.file} not found")
        return spec

    def __iter__(self):
        return iter(self._models.values())

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> ModelSpec:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}; this server has {', '.join(self._models)}") from None
