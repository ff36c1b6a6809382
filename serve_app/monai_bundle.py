"""A MONAI bundle read into a ``ModelSpec``, with MONAI's own bundle machinery (``monai.bundle.ConfigParser``).

A bundle folder (MONAI's format)::

    configs/metadata.json             version, description, network_data_format (modality, label channels)
    configs/inference.json            or inference.yaml / .yml: network_def, preprocessing, inferer
    models/model.pt                   a state dict of network_def, and/or
    models/model.ts                   the network as TorchScript

What is mapped, into the same typed spec a model.yaml gives (so the rest of the pipeline cannot tell them apart):

=====================================================  ===================================================
bundle                                                 ModelSpec
=====================================================  ===================================================
``metadata.json`` version, description                 version, description
``network_data_format.inputs.image.modality``          modality (CT, MR)
``network_data_format.outputs.<out>.channel_def``      labels (channel -> name; 0 is background)
``network_def`` (a class of monai.networks.nets)       network (name and resolved arguments)
``models/model.pt`` / ``models/model.ts``              weights (the state dict where network_def maps)
``preprocessing``: LoadImage, EnsureChannelFirst,      nothing: medserve's readers load a study as one
EnsureType, ToTensor (and their dict forms)            channel-first float32 image
Orientation(d) ``axcodes``                             preprocessing.orientation
Spacing(d) ``pixdim`` (bilinear)                       preprocessing.target_spacing
ScaleIntensityRange(d) (clipped)                       preprocessing.intensity_window
Resize(d) ``spatial_size`` (area)                      preprocessing.spatial_size (with SimpleInferer)
``inferer``: SlidingWindowInferer                      preprocessing.roi_size, inference.sw_batch_size
                                                       and overlap
=====================================================  ===================================================

Anything else is refused with ``InvalidBundle``, naming the file and the field or transform: a transform medserve
does not run, an option of a mapped one that medserve's would not honour (Spacing's nearest mode, an unclipped
intensity range), spatial steps in another order, a sigmoid or thresholded output. Nothing is guessed.

A bundle's config is code (``$`` expressions are evaluated by ConfigParser): only the items mapped above are
resolved, and only bundles the operator put in the repository (or imported with ``medserve import-bundle``) are read.

    spec = read_bundle(Path("repo/spleen"), name="spleen")
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from serve_app.model_spec import ModelRepositoryError, ModelSpec, WeightsFormat, validation_problems

__all__ = ["INFERENCE_CONFIG_NAMES", "STATE_DICT_FILE", "TORCHSCRIPT_FILE", "InvalidBundle", "read_bundle"]

INFERENCE_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
# Where a bundle keeps its weights, relative to its folder.
STATE_DICT_FILE, TORCHSCRIPT_FILE = "models/model.pt", "models/model.ts"
# ConfigParser's keys of a component that are not its constructor's arguments.
_SPECIAL_KEYS = {"_target_", "_desc_", "_requires_", "_disabled_", "_mode_"}
# What medserve's study readers already do: loading, channel first, float32 tensors.
_DONE_BY_READERS = {"LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor"}
# The spatial and intensity steps, in the order medserve runs them (serve_app/segmentation/transforms.py).
_MAPPED_ORDER = ("Orientation", "Spacing", "ScaleIntensityRange", "Resize")
_REFERENCE = re.compile(r"^\$?@([A-Za-z0-9_:#]+)$")
_MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR"}


class InvalidBundle(ModelRepositoryError):
    """A bundle medserve cannot serve as it is: ``file``, the ``field`` (a config id such as
    ``preprocessing::transforms::3``, or a transform's name) and what is wrong."""

    def __init__(self, file: Path | str, field: str, problem: str):
        super().__init__(str(file), field, problem)  # all in args, so the error pickles

    @property
    def file(self) -> str:
        return self.args[0]

    @property
    def field(self) -> str:
        return self.args[1]

    def __str__(self) -> str:
        return f"{self.args[0]}: {self.args[1]}: {self.args[2]}"


def read_bundle(folder: Path, name: str) -> ModelSpec:
    """The bundle in ``folder`` as model ``name``'s spec (source ``monai-bundle``); ``InvalidBundle`` naming the
    file and field of the first thing that cannot be mapped."""
    return _Bundle(Path(folder)).spec(name)


class _Bundle:
    """One bundle's metadata and inference config, parsed by ConfigParser; ids use its ``::`` separator."""

    def __init__(self, folder: Path):
        from monai.bundle import ConfigParser

        self.folder = folder
        self.metadata_file = folder / "configs" / "metadata.json"
        found = [folder / "configs" / n for n in INFERENCE_CONFIG_NAMES if (folder / "configs" / n).is_file()]
        if not self.metadata_file.is_file():
            raise InvalidBundle(
                self.metadata_file, "metadata.json", "missing: a MONAI bundle has configs/metadata.json"
            )
        if len(found) != 1:
            problem = "missing" if not found else f"{len(found)} of them; keep one"
            raise InvalidBundle(folder / "configs", "inference.json or inference.yaml", problem)
        self.config_file = found[0]
        self.metadata = self._load(ConfigParser, self.metadata_file)
        self.parser = ConfigParser(self._load(ConfigParser, self.config_file))
        if "bundle_root" in self.parser:
            self.parser["bundle_root"] = str(folder)  # as `python -m monai.bundle run --bundle_root` sets it

    @staticmethod
    def _load(config_parser, path: Path) -> dict:
        try:
            content = config_parser.load_config_file(path)
        except Exception as e:  # json's, yaml's and ConfigParser's own (a duplicate key) errors alike
            raise InvalidBundle(path, "(the whole file)", f"cannot be parsed: {e}") from None
        if not isinstance(content, dict):
            raise InvalidBundle(path, "(the whole file)", f"is not a mapping (got {type(content).__name__})")
        return content

    def spec(self, name: str) -> ModelSpec:
        preprocessing, geometry_step = self._preprocessing()
        inference = self._inference(preprocessing, geometry_step)
        self._check_postprocessing()
        network = self._network()
        raw = {
            "name": name,
            "version": self._metadata_field("version", str),
            "task": "segmentation",
            "modality": self._modality(),
            "description": self.metadata.get("description", ""),
            "labels": self._labels(),
            "preprocessing": preprocessing,
            "inference": inference,
            "network": network,
            "weights": self._weights(network),
            "folder": self.folder,
            "source": "monai-bundle",
        }
        try:
            return ModelSpec.model_validate(raw)
        except ValidationError as e:
            raise InvalidBundle(self.config_file, "(as medserve's model spec)", f"\n{validation_problems(e)}") from None

    # --- metadata.json -------------------------------------------------------------------------------------------

    def _metadata_field(self, dotted: str, kind: type) -> Any:
        value: Any = self.metadata
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                raise InvalidBundle(self.metadata_file, dotted, "missing")
            value = value[part]
        if not isinstance(value, kind):
            raise InvalidBundle(self.metadata_file, dotted, f"must be a {kind.__name__} (got {value!r})")
        return value

    def _modality(self) -> str:
        field = "network_data_format.inputs.image.modality"
        modality = self._metadata_field(field, str)
        if modality.upper() not in _MODALITIES:
            raise InvalidBundle(self.metadata_file, field, f"{modality!r}: medserve serves CT and MR models")
        channels_field = "network_data_format.inputs.image.num_channels"
        channels = self._metadata_field(channels_field, int)
        if channels != 1:
            raise InvalidBundle(self.metadata_file, channels_field, f"{channels}: medserve gives a model one channel")
        return _MODALITIES[modality.upper()]

    def _labels(self) -> dict[int, str]:
        outputs = self._metadata_field("network_data_format.outputs", dict)
        if len(outputs) != 1:
            raise InvalidBundle(
                self.metadata_file, "network_data_format.outputs", f"{len(outputs)} outputs; medserve serves one"
            )
        (output,) = outputs
        field = f"network_data_format.outputs.{output}.channel_def"
        channel_def = self._metadata_field(field, dict)
        try:
            labels = {int(channel): str(label) for channel, label in channel_def.items()}
        except ValueError:
            raise InvalidBundle(
                self.metadata_file, field, f"channels must be numbers (got {list(channel_def)})"
            ) from None
        if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
            raise InvalidBundle(
                self.metadata_file,
                field,
                f"channels must be 0..C-1 with C >= 2, 0 the background (got {sorted(labels)})",
            )
        count = self.metadata["network_data_format"]["outputs"][output].get("num_channels")
        if count is not None and count != len(labels):
            raise InvalidBundle(self.metadata_file, field, f"names {len(labels)} channels; num_channels says {count}")
        return labels

    # --- inference config ------------------------------------------------------------------------------------------

    def _raw(self, id: str) -> Any:
        """The unresolved config at ``id``, following one plain reference (``@x`` or ``$@x``)."""
        value = self.parser[id]
        if isinstance(value, str) and (match := _REFERENCE.match(value)):
            value = self.parser[match.group(1).replace("#", "::")]
        return value

    def _resolved(self, id: str) -> Any:
        """The value at ``id`` with its references and expressions resolved by ConfigParser."""
        try:
            return self.parser.get_parsed_content(id, instantiate=True)
        except Exception as e:
            raise InvalidBundle(self.config_file, id, f"cannot be resolved: {type(e).__name__}: {e}") from None

    def _arguments(self, id: str, component: dict) -> dict[str, Any]:
        return {k: self._resolved(f"{id}::{k}") for k in component if k not in _SPECIAL_KEYS}

    def _preprocessing(self) -> tuple[dict[str, Any], str | None]:
        """The preprocessing section's fields, and the id of the Resize that gives its grid (None: none does)."""
        if "preprocessing" not in self.parser:
            raise InvalidBundle(self.config_file, "preprocessing", "missing")
        compose = self._raw("preprocessing")
        if not isinstance(compose, dict) or _transform_name(compose.get("_target_")) != "Compose":
            raise InvalidBundle(self.config_file, "preprocessing", "must be a Compose of transforms")
        base = "preprocessing::transforms"
        if isinstance(compose.get("transforms"), str) and (match := _REFERENCE.match(compose["transforms"])):
            base = match.group(1).replace("#", "::")
        transforms = self._raw(base)
        if not isinstance(transforms, list):
            raise InvalidBundle(self.config_file, base, "must be a list of transforms")
        fields: dict[str, Any] = {}
        resize_id, last_rank, keys = None, -1, None
        for i, transform in enumerate(transforms):
            id = f"{base}::{i}"
            if not isinstance(transform, dict) or transform.get("_disabled_") in (True, "true", "True"):
                continue
            name = _transform_name(transform.get("_target_"))
            where = f"{id} ({transform.get('_target_')})"
            args = self._arguments(id, transform)
            if "keys" in args:
                these = [args.pop("keys")] if isinstance(args.get("keys"), str) else list(args.pop("keys"))
                if keys is not None and these != keys or len(these) != 1:
                    raise InvalidBundle(self.config_file, f"{where} keys", f"{these}: medserve maps one image key")
                keys = these
            args.pop("allow_missing_keys", None)
            if name in _DONE_BY_READERS:
                continue
            if name not in _MAPPED_ORDER:
                mapped = ", ".join(sorted(_DONE_BY_READERS | set(_MAPPED_ORDER)))
                raise InvalidBundle(
                    self.config_file,
                    where,
                    f"a transform medserve does not run (it maps {mapped} and their dict forms)",
                )
            rank = _MAPPED_ORDER.index(name)
            if rank <= last_rank:
                raise InvalidBundle(
                    self.config_file,
                    where,
                    f"out of order or repeated: medserve runs {', '.join(_MAPPED_ORDER)} once each, in this order",
                )
            last_rank = rank
            fields.update(_mapped(self.config_file, where, _MAPPINGS[name], args))
            if name == "Resize":
                resize_id = where
        if "intensity_window" not in fields:
            raise InvalidBundle(
                self.config_file, base, "no ScaleIntensityRange(d): medserve needs the intensity window"
            )
        if "orientation" not in fields:
            raise InvalidBundle(
                self.config_file, base, "no Orientation(d): medserve orients every study, to the axcodes a bundle names"
            )
        return fields, resize_id

    def _inference(self, preprocessing: dict[str, Any], resize_id: str | None) -> dict[str, Any]:
        if "inferer" not in self.parser:
            raise InvalidBundle(self.config_file, "inferer", "missing")
        inferer = self._raw("inferer")
        name = _transform_name(inferer.get("_target_")) if isinstance(inferer, dict) else None
        if name == "SimpleInferer":
            if resize_id is None:
                raise InvalidBundle(
                    self.config_file,
                    "inferer (SimpleInferer)",
                    "a whole-volume inferer needs a Resize(d) in preprocessing",
                )
            return {}
        if name != "SlidingWindowInferer":
            raise InvalidBundle(
                self.config_file,
                f"inferer ({inferer.get('_target_') if isinstance(inferer, dict) else inferer})",
                "medserve runs SimpleInferer or SlidingWindowInferer",
            )
        if resize_id is not None:
            raise InvalidBundle(
                self.config_file, resize_id, "a Resize before a SlidingWindowInferer: medserve takes one or the other"
            )
        args = self._arguments("inferer", inferer)
        _only(
            self.config_file, "inferer (SlidingWindowInferer)", args, {"roi_size", "sw_batch_size", "overlap", "mode"}
        )
        if args.pop("mode", "constant") != "constant":
            raise InvalidBundle(self.config_file, "inferer::mode", "medserve blends windows with mode constant")
        if "roi_size" not in args:
            raise InvalidBundle(self.config_file, "inferer::roi_size", "missing")
        preprocessing["roi_size"] = args.pop("roi_size")
        return args

    def _check_postprocessing(self) -> None:
        """medserve's postprocessing is softmax and argmax: a bundle whose output is not is refused."""
        if "postprocessing" not in self.parser:
            return
        compose = self._raw("postprocessing")
        transforms = compose.get("transforms") if isinstance(compose, dict) else None
        for i, transform in enumerate(transforms if isinstance(transforms, list) else []):
            if not isinstance(transform, dict):
                continue
            name = _transform_name(transform.get("_target_"))
            where = f"postprocessing::transforms::{i} ({transform.get('_target_')})"
            if name == "Activations" and "sigmoid" in transform and self._resolved(f"{where.split()[0]}::sigmoid"):
                raise InvalidBundle(self.config_file, where, "sigmoid outputs: medserve takes a softmax over channels")
            if name == "AsDiscrete" and "threshold" in transform:
                raise InvalidBundle(
                    self.config_file, where, "thresholded outputs: medserve takes the argmax of channels"
                )

    def _network(self) -> dict[str, Any] | None:
        """network_def as a monai.networks.nets class and its arguments; None where it is not one (TorchScript)."""
        import monai.networks.nets

        if "network_def" not in self.parser:
            return None
        network_def = self._raw("network_def")
        target = network_def.get("_target_") if isinstance(network_def, dict) else None
        class_name = str(target).removeprefix("monai.networks.nets.")
        if not isinstance(target, str) or "." in class_name or not hasattr(monai.networks.nets, class_name):
            return None
        return {"name": class_name, "args": self._arguments("network_def", network_def)}

    def _weights(self, network: dict[str, Any] | None) -> dict[str, str]:
        state_dict, torchscript = (self.folder / STATE_DICT_FILE).is_file(), (self.folder / TORCHSCRIPT_FILE).is_file()
        if state_dict and network is not None:
            return {"file": STATE_DICT_FILE, "format": WeightsFormat.monai_state_dict}
        if torchscript:
            return {"file": TORCHSCRIPT_FILE, "format": WeightsFormat.torchscript}
        if state_dict:
            target = self.parser.get("network_def", {}).get("_target_") if "network_def" in self.parser else None
            raise InvalidBundle(
                self.config_file,
                f"network_def ({target})",
                "not a class of monai.networks.nets, so models/model.pt cannot be loaded into it: ship models/model.ts",
            )
        raise InvalidBundle(self.folder / "models", "model.pt or model.ts", "missing: a bundle needs its weights")


def _transform_name(target: Any) -> str | None:
    """A transform's (or inferer's) class name without MONAI's module prefix, and its dict form's ``d``."""
    if not isinstance(target, str):
        return None
    for prefix in ("monai.transforms.", "monai.inferers."):
        target = target.removeprefix(prefix)
    if "." in target:
        return target  # another module's class: not one medserve maps
    for name in (*_DONE_BY_READERS, *_MAPPED_ORDER, "Activations", "AsDiscrete"):
        if target in (name, f"{name}d", f"{name}D", f"{name}Dict"):
            return name
    return target


def _only(file: Path, where: str, args: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise InvalidBundle(
            file, f"{where} {unknown[0]}", f"an option medserve does not map (it maps {', '.join(sorted(allowed))})"
        )


@dataclass(frozen=True)
class _Mapping:
    """How a transform's options become preprocessing fields."""

    fields: dict[str, str]  # option -> the PreprocessingSpec field (dotted: inside a section) it gives
    required: tuple[str, ...]
    honoured: dict[str, tuple[Any, Any, str]] = field(default_factory=dict)  # option -> (the value medserve
    # runs, MONAI's default for it, why no other)


_MAPPINGS = {
    "Orientation": _Mapping({"axcodes": "orientation"}, ("axcodes",)),
    "Spacing": _Mapping(
        {"pixdim": "target_spacing"}, ("pixdim",), {"mode": ("bilinear", "bilinear", "medserve resamples bilinearly")}
    ),
    "ScaleIntensityRange": _Mapping(
        {k: f"intensity_window.{k}" for k in ("a_min", "a_max", "b_min", "b_max")},
        ("a_min", "a_max"),
        {"clip": (True, False, "medserve clips to the window (give clip true)")},
    ),
    "Resize": _Mapping(
        {"spatial_size": "spatial_size"},
        ("spatial_size",),
        {"mode": ("area", "area", "medserve resizes with mode area")},
    ),
}


def _mapped(file: Path, where: str, mapping: _Mapping, args: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing fields one transform's ``args`` give; ``InvalidBundle`` for an option it cannot honour."""
    _only(file, where, args, set(mapping.fields) | set(mapping.honoured))
    for option, (honoured, default, why) in mapping.honoured.items():
        value = args.get(option, default)
        if (value[0] if isinstance(value, list | tuple) and len(value) == 1 else value) != honoured:
            raise InvalidBundle(file, f"{where} {option}", f"{value!r}: {why}")
    fields: dict[str, Any] = {}
    for option, field_name in mapping.fields.items():
        if option not in args:
            if option in mapping.required:
                raise InvalidBundle(file, f"{where} {option}", "missing")
            continue
        section, _, name = field_name.rpartition(".")
        (fields.setdefault(section, {}) if section else fields)[name] = args[option]
    return fields
