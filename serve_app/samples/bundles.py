"""Sample MONAI bundles: a model.yaml model written in MONAI's bundle format, for ``medserve sample-bundle`` and the
tests of ``serve_app.monai_bundle``."""

from __future__ import annotations

from pathlib import Path

import monai
import torch
from monai.bundle import ConfigParser
from monai.data.torchscript_utils import save_net_with_metadata

from serve_app.engines.torch_engine import build_network
from serve_app.model_spec import ModelSpec, PreprocessingSpec
from serve_app.monai_bundle import STATE_DICT_FILE, TORCHSCRIPT_FILE

__all__ = ["write_bundle"]


def write_bundle(spec: ModelSpec, out: Path, config_format: str = "json", weights: str = "pt") -> Path:
    """Write a model.yaml model (state-dict weights of a monai.networks.nets class) as a MONAI bundle in ``out``:
    ``configs/metadata.json``, ``configs/inference.json`` (or ``.yaml``), ``models/model.pt`` and/or
    ``models/model.ts`` (``weights``: ``pt``, ``ts`` or ``both``); written with MONAI's own writers. Returns ``out``.

    The inverse of ``serve_app.monai_bundle.read_bundle`` for what it maps: ``medserve sample-bundle`` and the tests
    use it.

        write_bundle(ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("ct-phantom-organ"), Path("bundle"))
    """
    pre = spec.preprocessing
    if spec.network is None or not isinstance(pre, PreprocessingSpec):
        raise ValueError(f"model {spec.name}: only a 3D model with a MONAI network can be written as a bundle")
    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    grid = list(pre.spatial_size or pre.roi_size)
    channel_def = {str(k): label.name for k, label in sorted(spec.labels.items())}
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": spec.version,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "task": "segmentation",
        "description": spec.description,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "hounsfield" if spec.modality == "CT" else "magnitude",
                    "modality": spec.modality, "num_channels": 1, "spatial_shape": grid, "dtype": "float32",
                    "value_range": [pre.intensity_window.b_min, pre.intensity_window.b_max],
                    "is_patch_data": pre.roi_size is not None, "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "segmentation", "num_channels": len(channel_def),
                    "spatial_shape": grid, "dtype": "float32", "value_range": [0, 1],
                    "is_patch_data": pre.roi_size is not None, "channel_def": channel_def,
                }
            },
        },
    }  # fmt: skip
    window = pre.intensity_window
    transforms = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": pre.orientation},
        *([{"_target_": "Spacingd", "keys": "image", "pixdim": list(pre.target_spacing), "mode": "bilinear"}]
          if pre.target_spacing else []),
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": window.a_min, "a_max": window.a_max,
         "b_min": window.b_min, "b_max": window.b_max, "clip": True},
        *([{"_target_": "Resized", "keys": "image", "spatial_size": grid, "mode": "area"}] if pre.spatial_size else []),
        {"_target_": "EnsureTyped", "keys": "image"},
    ]  # fmt: skip
    inferer = (
        {"_target_": "SlidingWindowInferer", "roi_size": grid, "sw_batch_size": spec.inference.sw_batch_size,
         "overlap": spec.inference.overlap}
        if pre.roi_size else {"_target_": "SimpleInferer"}
    )  # fmt: skip
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": spec.network.name, **spec.network.args},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "inferer": inferer,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            ],
        },
    }
    ConfigParser.export_config_file(metadata, str(out / "configs" / "metadata.json"), fmt="json", indent=2)
    ConfigParser.export_config_file(inference, str(out / "configs" / f"inference.{config_format}"), fmt=config_format)
    network = build_network(spec).eval()
    if weights in ("pt", "both"):
        torch.save(network.state_dict(), out / STATE_DICT_FILE)
    if weights in ("ts", "both"):
        save_net_with_metadata(torch.jit.script(network), str(out / TORCHSCRIPT_FILE), meta_values=metadata)
    return out
