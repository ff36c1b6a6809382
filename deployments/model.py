"""ModelDeployment (split layout): one replica set per model, batching volumes dynamically onto its engine."""

from __future__ import annotations

import numpy as np
from ray import serve

from deployments.replica import BatchingReplica
from serve_app.config import AppConfig
from serve_app.engines.devices import replica_device
from serve_app.model_repository import ModelSpec
from serve_app.observability.metrics import ReplicaMetrics
from serve_app.segmentation.messages import Prediction
from serve_app.segmentation.stages import Predictor


@serve.deployment(name="ModelReplica")
class ModelDeployment(BatchingReplica):
    def __init__(self, spec: ModelSpec, config: AppConfig):
        self.predictor = Predictor(spec, replica_device())
        self.metrics = ReplicaMetrics(model=spec.name)

    @serve.batch
    async def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Each image is (C_in, *model_spatial) float32 on the host; so is each returned logits array."""
        self.metrics.batch(len(images))
        return [prediction.to_host() for prediction in self.predictor.predict(images)]
