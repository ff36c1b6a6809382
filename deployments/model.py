"""Model (split layout): one replica set per model, batching volumes dynamically onto its engine."""

from __future__ import annotations

import time

import numpy as np
from ray import serve

from serve_app.config import AppConfig, BatchingConfig
from serve_app.engines.devices import replica_device
from serve_app.segmentation.messages import Prediction
from serve_app.observability.metrics import ReplicaMetrics
from serve_app.model_repository import ModelRepository
from serve_app.segmentation.stages import Predictor


@serve.deployment(name="ModelReplica")
class ModelDeployment:
    def __init__(self, model_name: str, config: AppConfig):
        self.predictor = Predictor(ModelRepository(config.model_repository).get(model_name), replica_device())
        self.metrics = ReplicaMetrics(model=model_name)

    def reconfigure(self, user_config: dict) -> None:
        """BatchingConfig is the deployment's user_config: a config update retunes live replicas, no redeploy."""
        BatchingConfig.model_validate(user_config).apply_to(self.predict)

    @serve.batch
    async def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        self.metrics.batch(len(images))
        start = time.perf_counter()
        logits = [x.cpu().numpy() for x in self.predictor(images)]
        elapsed = time.perf_counter() - start
        return [Prediction(logits=x, batch_size=len(images), compute_s=elapsed) for x in logits]

    def ready(self) -> bool:
        return True
