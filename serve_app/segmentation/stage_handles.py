"""``StageHandles``: how a caller (the ingress, a benchmark) drives one request through either layout."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.errors import unwrap
from serve_app.model_repository import ModelSpec
from serve_app.segmentation.messages import Prediction, PreparedStudy, Segmentation
from serve_app.segmentation.stage_order import run_stages

__all__ = ["StageHandles"]

Answer = TypeVar("Answer")
_log = logging.getLogger(__name__)


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

    async def segment(
        self, spec: ModelSpec, upload_folder: Path, result_id: str, image_path: Path | None = None
    ) -> Segmentation:
        """The request through the stages; with ``image_path``, preprocessing also writes the study's image there
        (see ``Preprocessor``). A stage call whose replica dies is sent once more (Serve routes it to another
        replica); raises ``ReplicaLost`` (503) when that one dies too, and ``ServiceBusy`` (503) when a stage's
        queue is full: translated here, as Serve answers its own ``BackPressureError`` in plain text, without
        Retry-After, before the ingress's error handlers can."""
        try:
            return await self._segment(spec, upload_folder, result_id, image_path)
        except (BackPressureError, RayActorError) as e:
            raise unwrap(e) from None

    async def _segment(
        self, spec: ModelSpec, upload_folder: Path, result_id: str, image_path: Path | None
    ) -> Segmentation:
        model = self.model_handles[spec.key]
        image_file = None if image_path is None else str(image_path)
        if self.preprocess is None:
            return await _twice_if_lost(lambda: model.segment.remote(str(upload_folder), result_id, image_file))

        async def postprocess(prediction: Prediction, prepared: PreparedStudy):
            return await _twice_if_lost(
                lambda: self.postprocess.remote(prediction, prepared.model_affine, prepared.grid, spec, result_id)
            )

        return await run_stages(
            preprocess=lambda: _twice_if_lost(lambda: self.preprocess.remote(str(upload_folder), spec, image_file)),
            predict=lambda image: _twice_if_lost(lambda: model.predict.remote(image)),
            postprocess=postprocess,
        )

    async def ready(self) -> None:
        handles = [h for h in (self.preprocess, self.postprocess, *self.model_handles.values()) if h is not None]
        await asyncio.gather(*(h.ready.remote() for h in handles))


async def _twice_if_lost(call: Callable[[], Awaitable[Answer]]) -> Answer:
    """``call()``, and once more if the replica it reached died before answering. Safe because every stage is a
    function of its inputs alone, and postprocessing writes the result whole under the request's id, replacing
    what a dead replica left half-written (``ResultStore.save``)."""
    try:
        return await call()
    except RayActorError as e:
        _log.warning("a stage's replica died holding a call (%s); sending it once more", type(e).__name__)
        return await call()
