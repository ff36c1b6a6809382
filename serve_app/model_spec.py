"""What a ``model.yaml`` says: the ``…Spec`` sections of a model, read and validated into one ``ModelSpec``.

A MONAI bundle is read into the same ``ModelSpec`` (``serve_app/monai_bundle.py``); the repository
(``serve_app/model_repository.py``) finds a folder's models and reads each with one or the other.

    spec = read_model_spec(Path("repo/ct-phantom-organ/model.yaml"))
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Discriminator, Field, Tag, ValidationError, model_validator

from serve_app.strict_model import StrictModel

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "CodeSpec",
    "EngineSpec",
    "InferenceSpec",
    "IntensityWindowSpec",
    "LabelSpec",
    "ModelRef",
    "ModelRepositoryError",
    "ModelSpec",
    "NetworkSpec",
    "PreprocessingSpec",
    "TilePreprocessingSpec",
    "WeightsFormat",
    "WeightsSpec",
    "read_model_spec",
    "validation_problems",
]

SpatialSize = tuple[int, int, int]
Spacing = tuple[float, float, float]


class WeightsFormat(StrEnum):
    monai_state_dict = "monai_state_dict"  # a MONAI network spec + a torch state dict
    torchscript = "torchscript"
    onnx = "onnx"


class CodeSpec(StrictModel):
    """A coded concept as DICOM carries it: Code Value, Coding Scheme Designator and Code Meaning."""

    value: str = Field(min_length=1, max_length=64, description="The code itself, e.g. 78961009.")
    scheme: str = Field(
        min_length=1, max_length=16, description="Its coding scheme's designator: SCT (SNOMED CT), DCM, LN, ..."
    )
    meaning: str = Field(min_length=1, max_length=64, description="What it means in words, e.g. Spleen.")


# DICOM's Segmentation Property Category for an organ (CID 7150, as PS3.16 lists it today; older files and some
# tools write SCT 123037004, which SNOMED CT now calls "Body structure").
ANATOMICAL_STRUCTURE = CodeSpec(value="91723000", scheme="SCT", meaning="Anatomical Structure")


class LabelSpec(StrictModel):
    """One label of a model: its name, and what it is in codes that a DICOM SEG and SR carry.

    In a model.yaml a bare name (``1: organ``) is a label with that name and no code.
    """

    name: str = Field(
        min_length=1, max_length=64, description="The label's name; a DICOM SEG's segment label, shown by viewers."
    )
    code: CodeSpec | None = Field(
        None,
        description="What the label is (DICOM's Segmented Property Type, CID 7151 for anatomy), e.g. SCT 78961009 "
        "Spleen. Without it the category's code stands in, and viewers show the name.",
    )
    category: CodeSpec = Field(
        ANATOMICAL_STRUCTURE,
        description="What kind of thing it is (DICOM's Segmented Property Category, CID 7150); SCT 91723000 "
        "Anatomical Structure unless given.",
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def property_type(self) -> CodeSpec:
        """The segment's property type: the label's own code, or else its category (the most that is known)."""
        return self.code or self.category


class IntensityWindowSpec(StrictModel):
    """``ScaleIntensityRange``: [a_min, a_max] (HU for CT) onto [b_min, b_max], clipped."""

    a_min: float = Field(description="Lowest input value kept (HU for CT); lower values clip to it.")
    a_max: float = Field(description="Highest input value kept; higher values clip to it.")
    b_min: float = Field(0.0, description="What a_min maps to.")
    b_max: float = Field(1.0, description="What a_max maps to.")

    @model_validator(mode="after")
    def _ordered(self) -> IntensityWindowSpec:
        if self.a_max <= self.a_min:
            raise ValueError(f"a_max ({self.a_max}) must be greater than a_min ({self.a_min})")
        return self


class PreprocessingSpec(StrictModel):
    """The model's MONAI preprocessing: orientation, spacing, intensity window, then its grid."""

    orientation: str = Field("RAS", pattern="^[LRAPSI]{3}$", description="Axis codes the volume is turned to.")
    target_spacing: Spacing | None = Field(
        None, description="Voxel spacing in mm to resample to; null keeps the input's."
    )
    intensity_window: IntensityWindowSpec = Field(description="Intensities onto the model's range.")
    spatial_size: SpatialSize | None = Field(
        None, description="A fixed size every volume is resized to (whole volumes are batched); or give roi_size."
    )
    roi_size: SpatialSize | None = Field(
        None, description="Sliding-window inference with this window over any size (windows are batched)."
    )

    @model_validator(mode="after")
    def _one_geometry(self) -> PreprocessingSpec:
        if (self.spatial_size is None) == (self.roi_size is None):
            given = "both" if self.spatial_size is not None else "neither"
            raise ValueError(f"give exactly one of spatial_size and roi_size (got {given})")
        return self


class TilePreprocessingSpec(StrictModel):
    """A tile classifier's input: square RGB tiles at a resolution, scaled and normalised per channel.

    A tile of ``tile_size`` x ``tile_size`` pixels at ``mpp`` microns per pixel, (H, W, 3) uint8 RGB as read
    from the slide, becomes the network's (3, H, W) float32 ``(rgb / scale - mean) / std``.
    """

    mpp: float = Field(gt=0, le=100, description="Microns per pixel the model was trained at (0.5 is 20x).")
    tile_size: int = Field(ge=16, le=4096, description="Side of one tile in pixels, at mpp.")
    scale: float = Field(255.0, gt=0, description="RGB values are divided by this first.")
    mean: tuple[float, float, float] = Field((0.0, 0.0, 0.0), description="Per-channel (R, G, B) mean subtracted.")
    std: tuple[float, float, float] = Field((1.0, 1.0, 1.0), description="Per-channel (R, G, B) divisor.")

    @model_validator(mode="after")
    def _positive_std(self) -> TilePreprocessingSpec:
        if min(self.std) <= 0:
            raise ValueError(f"std {self.std} must be positive in every channel")
        return self


_VOLUME, _TILES = "volume", "tiles"  # the two kinds of preprocessing; dropped from error locations


def _preprocessing_kind(value: Any) -> str:
    """Which preprocessing a model.yaml's section is: a tile classifier's names its mpp or tile_size."""
    if isinstance(value, TilePreprocessingSpec):
        return _TILES
    if isinstance(value, dict) and ({"mpp", "tile_size"} & value.keys()):
        return _TILES
    return _VOLUME


class InferenceSpec(StrictModel):
    """The sliding-window inferer's settings, used when ``preprocessing.roi_size`` is set."""

    sw_batch_size: int = Field(4, ge=1, description="Windows run through the network at once.")
    overlap: float = Field(0.25, ge=0, lt=1, description="Fraction by which neighbouring windows overlap.")


class NetworkSpec(StrictModel):
    """A network class of ``monai.networks.nets`` and its constructor arguments."""

    name: str = Field(description="A class of monai.networks.nets, e.g. UNet.")
    args: dict[str, Any] = Field({}, description="Its constructor's keyword arguments.")


class WeightsSpec(StrictModel):
    """The network's trained weights, a file in the model's folder."""

    file: str = Field(description="The weights file, relative to the model's folder.")
    format: WeightsFormat = Field(description="monai_state_dict (with network), torchscript or onnx.")


class EngineSpec(StrictModel):
    """How the network runs. Options a backend cannot honour are ignored on it (fp16 on a CPU, say)."""

    backend: Literal["torch", "onnxruntime", "tensorrt"] = Field("torch", description="Which engine runs the network.")
    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp32", description="Arithmetic inside the engine; int8: TensorRT only, calibrated on sample volumes."
    )
    channels_last: bool = Field(False, description="torch on CUDA: the channels-last (2D) or -3d memory format.")
    cuda_graphs: bool = Field(False, description="torch on CUDA: replay one captured graph per padded batch size.")
    compile: bool = Field(False, description="torch: torch.compile the network.")
    batch_sizes: tuple[int, ...] = Field(
        (1, 2, 4, 8),
        description="Batches are padded up to the next of these sizes, so engines, graphs and TensorRT "
        "profiles see few shapes.",
    )
    onnx_file: str = Field(
        "model.onnx", description="onnxruntime / tensorrt: the ONNX file beside the weights; exported on first use."
    )

    @model_validator(mode="after")
    def _sizes(self) -> EngineSpec:
        if not self.batch_sizes or list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] < 1:
            sizes = ", ".join(map(str, self.batch_sizes))
            raise ValueError(f"batch_sizes ({sizes}) must be increasing positive integers")
        if self.precision == "int8" and self.backend != "tensorrt":
            raise ValueError(f"precision int8 needs backend tensorrt (got {self.backend})")
        return self


class ModelSpec(StrictModel):
    """A model of the repository, as its ``model.yaml`` describes it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="The model's name; equal to its folder's.")
    version: str = Field(description="The model's version, reported with every result.")
    task: Literal["segmentation", "tile_classification"] = Field(
        "segmentation",
        description="segmentation: 3D studies in, label masks out (POST /v1/models/{name}/segment). "
        "tile_classification: whole-slide images in, a heatmap of label 1's probability out (WSI jobs).",
    )
    modality: Literal["CT", "MR", "SM"] = Field(
        description="The DICOM modality it takes (SM: slide microscopy, for tile classifiers); another gets a 422."
    )
    description: str = Field("", description="Free text, shown by GET /v1/models.")
    labels: dict[int, LabelSpec] = Field(
        description="Label value -> the label: a name, or a name with SNOMED CT codes for DICOM results; 0 is "
        "background (segmentation) or the negative class (tile classifiers)."
    )
    preprocessing: Annotated[
        Annotated[PreprocessingSpec, Tag(_VOLUME)] | Annotated[TilePreprocessingSpec, Tag(_TILES)],
        Discriminator(_preprocessing_kind),
    ] = Field(
        description="The model's input: a 3D study's MONAI preprocessing (segmentation), or tiles "
        "(tile_classification)."
    )
    inference: InferenceSpec = Field(InferenceSpec(), description="Sliding-window settings (with roi_size).")
    network: NetworkSpec | None = Field(None, description="The MONAI network, for monai_state_dict weights.")
    weights: WeightsSpec = Field(description="The weights file and its format.")
    engine: EngineSpec = Field(EngineSpec(), description="How the network runs.")
    folder: Path = Field(Path("."), description="The model's own folder; filled in by the repository.")
    source: Literal["model.yaml", "monai-bundle"] = Field(
        "model.yaml", description="What the model was read from; filled in by the repository."
    )
    versioned: bool = Field(
        False,
        description="Whether the model's folder is one of its versions (<name>/<version>/); filled in by the "
        "repository.",
    )
    digest: str = Field(
        "", description="SHA-256 of the model folder's files; filled in by the repository (a change redeploys it)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.labels.get(0) is None:
            raise ValueError(f"labels must name label 0 (background); got labels {sorted(self.labels)}")
        if self.weights.format is WeightsFormat.monai_state_dict and self.network is None:
            raise ValueError("weights.format monai_state_dict needs a network")
        tiles = self.task == "tile_classification"
        if tiles != isinstance(self.preprocessing, TilePreprocessingSpec):
            wanted = "mpp and tile_size" if tiles else "orientation, intensity_window and a grid"
            raise ValueError(f"task {self.task} needs preprocessing with {wanted}")
        if tiles != (self.modality == "SM"):
            raise ValueError(f"task {self.task} cannot take modality {self.modality}")
        if tiles and sorted(self.labels) != [0, 1]:
            raise ValueError(
                f"a tile classifier has labels 0 and 1 (its heatmap is label 1's); got {sorted(self.labels)}"
            )
        return self

    @property
    def input_item_shape(self) -> tuple[int, ...]:
        """One item of the network's input, ``(C, *spatial)``: (1, *grid) for a study, (3, H, W) for a tile."""
        if isinstance(self.preprocessing, TilePreprocessingSpec):
            return (3, self.preprocessing.tile_size, self.preprocessing.tile_size)
        return (1, *(self.preprocessing.spatial_size or self.preprocessing.roi_size))

    @property
    def key(self) -> str:
        """The model among the served ones: its name, or ``name:version`` in the versioned layout (its deployments
        are named after it: ``ModelReplica:ct-phantom-organ``, ``ModelReplica:ct-phantom-organ:2.0.0``)."""
        return f"{self.name}:{self.version}" if self.versioned else self.name

    @property
    def weights_path(self) -> Path:
        return self.folder / self.weights.file

    @property
    def foreground_labels(self) -> list[int]:
        return sorted(k for k in self.labels if k != 0)


class ModelRepositoryError(ValueError):
    """A model of the repository is missing or invalid: the message names its file and what is wrong."""


def read_model_spec(path: Path) -> ModelSpec:
    """One validated ``model.yaml``; its folder is where the weights are looked for."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
        return ModelSpec.model_validate({**raw, "folder": path.parent})
    except (yaml.YAMLError, TypeError) as e:
        raise ModelRepositoryError(f"{path}: not a YAML mapping ({e})") from None
    except ValidationError as e:
        raise ModelRepositoryError(f"{path} is invalid:\n{validation_problems(e)}") from None


def validation_problems(error: ValidationError) -> str:
    """One indented line per problem of a ModelSpec's validation: the dotted field, then pydantic's message."""
    return "\n".join(
        f"  {'.'.join(str(part) for part in err['loc'] if part not in (_VOLUME, _TILES))}: {err['msg']}"
        for err in error.errors()
    )


class ModelRef(BaseModel):
    """A model version by name, as results and answers name the model that made them."""

    name: str = Field(description="The model's name.")
    version: str = Field(description="The model's version.")
