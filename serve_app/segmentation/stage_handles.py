"""``StageHandles``: how a caller (the ingress, a benchmark) drives one request through either layout."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.errors import unwrap
from serve_app.segmentation.messages import Prediction, PreparedStudy, Segmentation
from serve_app.segmentation.stages import run_stages

__all__ = ["StageHandles"]


@dataclass
class StageHandles:
    """The deployment handles of one application.

    ``model_handles`` maps model names to ``FusedPipelineDeployment`` handles when ``preprocess`` is None
    (fused layout), else to ``ModelDeployment`` handles (split layout).
    """

    model_handles: dict[str, DeploymentHandle]
    preprocess: DeploymentHandle | None = None
    postprocess: DeploymentHandle | None = None

    async def segment(
        self, model_name: str, upload_folder: Path, result_id: str, image_path: Path | None = None
    ) -> Segmentation:
        """The request through the stages; with ``image_path``, preprocessing also writes the study's image there
        (see ``Preprocessor``). Raises ``ServiceBusy`` (503) when a stage's queue is full: translated
        here, as Serve answers its own ``BackPressureError`` in plain text, without Retry-After, before the
        ingress's error handlers can."""
        try:
            return await self._segment(model_name, upload_folder, result_id, image_path)
        except BackPressureError as e:
            raise unwrap(e) from None

    async def _segment(
        self, model_name: str, upload_folder: Path, result_id: str, image_path: Path | None
    ) -> Segmentation:
        model = self.model_handles[model_name]
        image = None if image_path is None else str(image_path)
        if self.preprocess is None:
            return await model.segment.remote(str(upload_folder), result_id, image)

        async def postprocess(prediction: Prediction, prepared: PreparedStudy):
            return await self.postprocess.remote(
                prediction, prepared.model_affine, prepared.grid, model_name, result_id
            )

        return await run_stages(
            preprocess=lambda: self.preprocess.remote(str(upload_folder), model_name, image),
            predict=lambda image: model.predict.remote(image),
            postprocess=postprocess,
        )

    async def ready(self) -> None:
        handles = [h for h in (self.preprocess, self.postprocess, *self.model_handles.values()) if h is not None]
        await asyncio.gather(*(h.ready.remote() for h in handles))
