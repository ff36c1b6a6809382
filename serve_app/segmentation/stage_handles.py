"""How a caller (the ingress, a benchmark) drives one request through the stages of either layout."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ray.serve.handle import DeploymentHandle

from serve_app.segmentation.messages import Segmentation


@dataclass
class StageHandles:
    """``models`` are FusedPipeline handles when ``preprocess`` is None (fused), else ModelReplica handles."""

    models: dict[str, DeploymentHandle]
    preprocess: Optional[DeploymentHandle] = None
    postprocess: Optional[DeploymentHandle] = None

    async def segment(self, model_name: str, upload_folder: Path, result_id: str) -> Segmentation:
        model = self.models[model_name]
        if self.preprocess is None:
            return await model.segment.remote(str(upload_folder), result_id)
        study = await self.preprocess.remote(str(upload_folder), model_name)
        model_start = time.perf_counter()
        prediction = await model.predict.remote(study.image)
        model_s = time.perf_counter() - model_start
        labels, postprocess_s = await self.postprocess.remote(prediction, study.image_affine, study.grid, model_name, result_id)
        timings = {
            "preprocess": study.preprocess_s,
            "model_queue": max(model_s - prediction.compute_s, 0.0),
            "model": prediction.compute_s,
            "postprocess": postprocess_s,
        }
        return Segmentation(study.grid, labels, prediction.batch_size, study.study_instance_uid, timings)

    async def ready(self) -> None:
        handles = [h for h in (self.preprocess, self.postprocess, *self.models.values()) if h is not None]
        await asyncio.gather(*(h.ready.remote() for h in handles))
