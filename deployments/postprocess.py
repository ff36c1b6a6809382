"""PostprocessDeployment (split layout): probabilities onto the study's grid, labels, largest component, mL."""

from __future__ import annotations

from ray import serve

from deployments.replica import Replica
from serve_app.config import AppConfig
from serve_app.engines.devices import replica_device, to_device
from serve_app.model_repository import ModelSpec
from serve_app.observability.metrics import ReplicaMetrics
from serve_app.results import ResultStore
from serve_app.results.measurements import LabelVolume
from serve_app.segmentation.messages import Grid, Prediction
from serve_app.segmentation.stages import Postprocessor
from serve_app.studies.volume import Affine


@serve.deployment(name="Postprocess")
class PostprocessDeployment(Replica):
    def __init__(self, config: AppConfig):
        self.postprocessor = Postprocessor(ResultStore.of(config.storage))
        self.device = replica_device()
        self.metrics = ReplicaMetrics()

    def __call__(
        self, prediction: Prediction, model_affine: Affine, grid: Grid, spec: ModelSpec, result_id: str
    ) -> list[LabelVolume]:
        """``prediction.logits``: (C_out, *model_spatial) on the host; moved to this replica's device. The model's
        spec travels with the request, as to preprocessing."""
        logits = to_device(prediction.logits, self.device)
        return self.postprocessor(logits, model_affine, grid, spec, result_id)
