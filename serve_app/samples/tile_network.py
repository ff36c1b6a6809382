"""The embedded tile classifier: is a 224 x 224 H&E tile at 0.5 mpp normal tissue or tumour?

A small MONAI 2D ResNet (one basic block per stage, 16-128 channels, ~310 k parameters), trained on
synthetic tiles by ``scripts/train_tile_model.py``; its weights are a plain state dict in
``serve_app/models/he-tile-tumour/model.pt``. A demonstration model, not for clinical use.

Input and output:

- tiles: (N, 224, 224, 3) uint8 RGB at 0.5 mpp (microns per pixel);
- ``tiles_to_input``: (N, 3, 224, 224) float32 RGB scaled to [0, 1], the network's input contract;
- ``normalise``: per channel ``(x - TILE_MEAN) / TILE_STD``, what MONAI's
  ``NormalizeIntensity(subtrahend=TILE_MEAN, divisor=TILE_STD, channel_wise=True)`` does to each tile;
- network: (N, 2) logits, in the order of ``LABELS`` (normal, tumour).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import ResNet

from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.model_spec import TilePreprocessingSpec, read_model_spec

__all__ = [
    "LABELS",
    "MODEL_NAME",
    "NETWORK_ARGS",
    "NETWORK_NAME",
    "SPEC",
    "TILE_MEAN",
    "TILE_MPP",
    "TILE_SIZE",
    "TILE_STD",
    "WEIGHTS_PATH",
    "load_tile_network",
    "normalise",
    "tile_network",
    "tiles_to_input",
    "tumour_probability",
]

MODEL_NAME = "he-tile-tumour"
# Everything about the model is read from its model.yaml, the one place that says it.
SPEC = read_model_spec(EMBEDDED_MODEL_REPOSITORY / MODEL_NAME / "model.yaml")
assert isinstance(SPEC.preprocessing, TilePreprocessingSpec) and SPEC.network is not None
TILE_SIZE = SPEC.preprocessing.tile_size  # pixels, square
TILE_MPP = SPEC.preprocessing.mpp  # microns per pixel the network was trained at
LABELS = {value: label.name for value, label in SPEC.labels.items()}  # value -> name
WEIGHTS_PATH = SPEC.weights_path
# Mean and spread of the synthetic training tiles, rounded; RGB in [0, 1].
TILE_MEAN = SPEC.preprocessing.mean
TILE_STD = SPEC.preprocessing.std
NETWORK_NAME = SPEC.network.name  # of monai.networks.nets
NETWORK_ARGS = SPEC.network.args


def tile_network() -> ResNet:
    """The untrained network: (N, 3, 224, 224) normalised float32 -> (N, 2) logits."""
    return ResNet(**NETWORK_ARGS)


def load_tile_network(weights: Path = WEIGHTS_PATH) -> ResNet:
    """The trained network, on the CPU, in eval mode."""
    network = tile_network()
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return network.eval()


def tiles_to_input(tiles: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 RGB in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float().div_(255.0)


def normalise(tiles: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float32 RGB in [0, 1] -> the same, centred and scaled per channel as in training."""
    mean = torch.tensor(TILE_MEAN, dtype=tiles.dtype, device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(TILE_STD, dtype=tiles.dtype, device=tiles.device).view(1, 3, 1, 1)
    return (tiles - mean) / std


@torch.inference_mode()
def tumour_probability(network: torch.nn.Module, tiles: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(tumour) of each (224, 224, 3) uint8 RGB tile at 0.5 mpp: (N,) float32."""
    probabilities = [
        torch.softmax(network(normalise(tiles_to_input(tiles[i : i + batch_size]))), dim=1)[:, 1]
        for i in range(0, len(tiles), batch_size)
    ]
    return torch.cat(probabilities).numpy() if probabilities else np.empty(0, np.float32)
