"""The tile classifier: a tile model on one device, uint8 RGB tiles in, one probability per tile out."""

from __future__ import annotations

import numpy as np
import torch

from serve_app.engines.base import load_engine
from serve_app.model_spec import ModelSpec, TilePreprocessingSpec

__all__ = ["TileClassifier"]


class TileClassifier:
    """Runs a ``tile_classification`` model through its engine (torch, onnxruntime, TensorRT).

    Tiles go to the device as uint8, a quarter of float32's bytes, and are scaled and normalised there.

    Args:
        spec: the model; ``spec.preprocessing`` gives the tile size, scale, mean and std.
        device: where the engine runs, e.g. ``cuda:0`` or ``cpu``.

    Usage::

        classifier = TileClassifier(spec, "cuda")
        p = classifier(tiles)   # tiles: (N, 224, 224, 3) uint8 RGB -> p: (N,) float32 P(label 1)
    """

    def __init__(self, spec: ModelSpec, device: torch.device | str):
        if not isinstance(spec.preprocessing, TilePreprocessingSpec):
            raise ValueError(f"model {spec.name} is not a tile classifier (task {spec.task})")
        self.spec = spec
        self.engine = load_engine(spec, device)
        self.device = self.engine.device
        pre = spec.preprocessing
        # (x / scale - mean) / std, folded into one multiply-add on the raw 0..255 values.
        std = torch.tensor(pre.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        mean = torch.tensor(pre.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._gain = 1.0 / (pre.scale * std)
        self._offset = -mean / std

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, T, T, 3) uint8 RGB tiles at the model's mpp, on the host or already on the device (decoded
        there) -> (N,) float32 on the host, each tile's P(label 1)."""
        if len(tiles) == 0:
            return np.empty(0, np.float32)
        if isinstance(tiles, np.ndarray):
            tiles = torch.from_numpy(np.ascontiguousarray(tiles))
        pixels = tiles.to(self.device)
        batch = pixels.permute(0, 3, 1, 2).float().mul_(self._gain).add_(self._offset)
        logits = self.engine(batch)
        return torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
