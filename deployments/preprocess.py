"""Preprocess (split layout): read the uploaded study and apply the model's MONAI transforms."""

from __future__ import annotations

import time

import numpy as np
from ray import serve

from serve_app.config import AppConfig
from serve_app.engines.devices import replica_device
from serve_app.segmentation.messages import Grid, PreparedStudy
from serve_app.observability.metrics import ReplicaMetrics
from serve_app.model_repository import ModelRepository
from serve_app.segmentation.stages import Preprocessor


@serve.deployment(name="Preprocess")
class PreprocessDeployment:
    def __init__(self, config: AppConfig):
        self.models = ModelRepository(config.model_repository)
        self.preprocessor = Preprocessor(config.limits, replica_device())
        self.metrics = ReplicaMetrics()

    def __call__(self, upload_folder: str, model_name: str) -> PreparedStudy:
        start = time.perf_counter()
        image, volume = self.preprocessor(upload_folder, self.models.get(model_name))
        return PreparedStudy(
            image=image.as_tensor().cpu().numpy(),
            image_affine=np.asarray(image.affine),
            grid=Grid(shape=volume.shape, affine=volume.affine),
            study_instance_uid=volume.study_instance_uid,
            preprocess_s=time.perf_counter() - start,
        )

    def ready(self) -> bool:
        return True
