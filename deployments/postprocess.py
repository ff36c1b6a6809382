"""Postprocess (split layout): probabilities onto the original grid, labels, largest component, mL."""

from __future__ import annotations

import time

import numpy as np
from ray import serve

from serve_app.config import AppConfig
from serve_app.engines.devices import replica_device, to_device
from serve_app.segmentation.messages import Grid, Prediction
from serve_app.observability.metrics import ReplicaMetrics
from serve_app.model_repository import ModelRepository
from serve_app.segmentation.stages import Postprocessor
from serve_app.results import ResultStore


@serve.deployment(name="Postprocess")
class PostprocessDeployment:
    def __init__(self, config: AppConfig):
        self.models = ModelRepository(config.model_repository)
        self.postprocessor = Postprocessor(ResultStore.of(config.storage))
        self.device = replica_device()
        self.metrics = ReplicaMetrics()

    def __call__(self, prediction: Prediction, image_affine: np.ndarray, grid: Grid, model_name: str, result_id: str) -> tuple[list[dict], float]:
        start = time.perf_counter()
        logits = to_device(prediction.logits, self.device)
        labels = self.postprocessor(logits, image_affine, grid, self.models.get(model_name), result_id)
        return labels, time.perf_counter() - start

    def ready(self) -> bool:
        return True
