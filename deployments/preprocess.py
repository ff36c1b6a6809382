"""PreprocessDeployment (split layout): read the uploaded study and apply the model's MONAI transforms."""

from __future__ import annotations

from ray import serve

from deployments.replica import Replica
from serve_app.config import AppConfig
from serve_app.engines.devices import replica_device
from serve_app.model_repository import ModelSpec
from serve_app.observability.input_drift import input_monitor
from serve_app.observability.metrics import ReplicaMetrics
from serve_app.segmentation.messages import PreparedStudy
from serve_app.segmentation.stages import Preprocessor


@serve.deployment(name="Preprocess")
class PreprocessDeployment(Replica):
    def __init__(self, config: AppConfig):
        self.preprocessor = Preprocessor(
            config.limits,
            replica_device(),
            header_processes=config.reading.header_processes(),
            monitor=input_monitor(config.input_monitoring.window_inputs),
        )
        self.metrics = ReplicaMetrics()

    def __call__(self, upload_folder: str, spec: ModelSpec, image_path: str | None = None) -> PreparedStudy:
        """The model's spec travels with each request: this deployment serves every model and version, those added
        by a reload too, without being redeployed. ``image_path``: where to also write the study's image for the
        result (``Preprocessor``), or None."""
        return self.preprocessor(upload_folder, spec, image_path).to_host()
