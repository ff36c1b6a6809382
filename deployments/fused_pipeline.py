"""Fused layout: preprocess, model and postprocess in one replica per model, tensors kept on its GPU."""

from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from serve_app.config import AppConfig, BatchingConfig
from serve_app.engines.devices import replica_device
from serve_app.segmentation.messages import Grid, Segmentation
from serve_app.observability.metrics import ReplicaMetrics
from serve_app.model_repository import ModelRepository
from serve_app.segmentation.stages import Postprocessor, Predictor, Preprocessor, Stopwatch
from serve_app.results import ResultStore


@serve.deployment(name="FusedPipeline")
class FusedPipelineDeployment:
    def __init__(self, model_name: str, config: AppConfig):
        device = replica_device()
        self.spec = ModelRepository(config.model_repository).get(model_name)
        self.preprocessor = Preprocessor(config.limits, device)
        self.predictor = Predictor(self.spec, device)
        self.postprocessor = Postprocessor(ResultStore.of(config.storage))
        self.metrics = ReplicaMetrics(model=model_name)

    def reconfigure(self, user_config: dict) -> None:
        BatchingConfig.model_validate(user_config).apply_to(self.predict)

    async def segment(self, upload_folder: str, result_id: str) -> Segmentation:
        watch = Stopwatch()
        # Reading and transforms run in threads so that other requests keep filling the batch.
        image, volume = await asyncio.to_thread(self.preprocessor, upload_folder, self.spec)
        watch.lap("preprocess")
        logits, batch_size, compute_s = await self.predict(image.as_tensor())
        watch.lap("model")
        grid = Grid(shape=volume.shape, affine=volume.affine)
        labels = await asyncio.to_thread(self.postprocessor, logits, image.affine, grid, self.spec, result_id)
        watch.lap("postprocess")
        timings = {**watch.laps, "model_queue": max(watch.laps["model"] - compute_s, 0.0), "model": compute_s}
        return Segmentation(grid, labels, batch_size, volume.study_instance_uid, timings)

    @serve.batch
    async def predict(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, int, float]]:
        self.metrics.batch(len(images))
        start = time.perf_counter()
        logits = self.predictor(images)
        if self.predictor.device.type == "cuda":
            torch.cuda.synchronize(self.predictor.device)  # so that compute time is compute, not launch
        elapsed = time.perf_counter() - start
        return [(x, len(images), elapsed) for x in logits]

    def ready(self) -> bool:
        return True
