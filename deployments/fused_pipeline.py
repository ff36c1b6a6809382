"""FusedPipelineDeployment: preprocess, model and postprocess in one replica per model, tensors kept on its GPU."""

from __future__ import annotations

import asyncio

import torch
from ray import serve

from deployments.replica import BatchingReplica
from serve_app.config import AppConfig
from serve_app.engines.devices import replica_device
from serve_app.model_repository import ModelSpec
from serve_app.observability.input_drift import input_monitor
from serve_app.observability.metrics import ReplicaMetrics
from serve_app.results import ResultStore
from serve_app.segmentation.messages import Prediction, PreparedStudy, Segmentation
from serve_app.segmentation.stage_order import run_stages
from serve_app.segmentation.stages import Postprocessor, Predictor, Preprocessor


@serve.deployment(name="FusedPipeline")
class FusedPipelineDeployment(BatchingReplica):
    def __init__(self, spec: ModelSpec, config: AppConfig):
        device = replica_device()
        self.spec = spec
        self.preprocessor = Preprocessor(
            config.limits,
            device,
            header_processes=config.reading.header_processes(),
            monitor=input_monitor(config.input_monitoring.window_inputs),
        )
        self.predictor = Predictor(self.spec, device)
        self.postprocessor = Postprocessor(ResultStore.of(config.storage))
        self.metrics = ReplicaMetrics(model=spec.name)

    async def segment(self, upload_folder: str, result_id: str, image_path: str | None = None) -> Segmentation:
        """``image_path``: where to also write the study's image for the result (``Preprocessor``), or None."""

        # Reading, transforms and postprocessing run in threads so that other requests keep filling the batch.
        def postprocess(prediction: Prediction, prepared: PreparedStudy):
            return asyncio.to_thread(
                self.postprocessor, prediction.logits, prepared.model_affine, prepared.grid, self.spec, result_id
            )

        return await run_stages(
            preprocess=lambda: asyncio.to_thread(self.preprocessor, upload_folder, self.spec, image_path),
            predict=self.predict,
            postprocess=postprocess,
        )

    @serve.batch
    async def predict(self, images: list[torch.Tensor]) -> list[Prediction]:
        """Each image is (C_in, *model_spatial) on this replica's device; so are the logits returned."""
        self.metrics.batch(len(images))
        return self.predictor.predict(images)
