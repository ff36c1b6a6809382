"""``StageHandles``: how a caller (the ingress, a benchmark) drives one request through either layout."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.errors import unwrap
from serve_app.model_repository import ModelSpec
from serve_app.segmentation.messages import Prediction, PreparedStudy, Segmentation
from serve_app.segmentation.stages import run_stages

__all__ = ["StageHandles"]


@dataclass
class StageHandles:
    """The deployment handles of one application.

    ``model_handles`` maps models' keys (``ModelSpec.key``: the name, or ``name:version``) to
    ``FusedPipelineDeployment`` handles when ``preprocess`` is None (fused layout), else to ``ModelDeployment``
    handles (split layout).
    """

    model_handles: dict[str, DeploymentHandle]
    preprocess: DeploymentHandle | None = None
    postprocess: DeploymentHandle | None = None

    async def segment(self, spec: ModelSpec, upload_folder: Path, result_id: str) -> Segmentation:
        """The request through the stages. Raises ``ServiceBusy`` (503) when a stage's queue is full: translated
        here, as Serve answers its own ``BackPressureError`` in plain text, without Retry-After, before the
        ingress's error handlers can."""
        try:
            return await self._segment(spec, upload_folder, result_id)
        except BackPressureError as e:
            raise unwrap(e) from None

    async def _segment(self, spec: ModelSpec, upload_folder: Path, result_id: str) -> Segmentation:
        model = self.model_handles[spec.key]
        if self.preprocess is None:
            return await model.segment.remote(str(upload_folder), result_id)

        async def postprocess(prediction: Prediction, prepared: PreparedStudy):
            return await self.postprocess.remote(prediction, prepared.model_affine, prepared.grid, spec, result_id)

        return await run_stages(
            preprocess=lambda: self.preprocess.remote(str(upload_folder), spec),
            predict=lambda image: model.predict.remote(image),
            postprocess=postprocess,
        )

    async def ready(self) -> None:
        handles = [h for h in (self.preprocess, self.postprocess, *self.model_handles.values()) if h is not None]
        await asyncio.gather(*(h.ready.remote() for h in handles))
