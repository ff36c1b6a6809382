"""What every medserve deployment shares: ``ready`` for /readyz, and live retuning of batching."""

from __future__ import annotations

from serve_app.config import BatchingConfig
from serve_app.segmentation.stages import Predictor

__all__ = ["BatchingReplica", "Replica"]


class Replica:
    """Base of every deployment class: the ingress's /readyz calls ``ready`` on each deployment."""

    def ready(self) -> bool:
        return True


class BatchingReplica(Replica):
    """A replica whose ``predict`` is a ``@serve.batch`` method running ``predictor``.

    Batching is the deployment's Serve ``user_config``: a config update retunes live replicas through
    ``reconfigure``, with no redeploy, and warms the predictor up for every batch size it may now see.
    """

    predictor: Predictor

    def reconfigure(self, user_config: dict) -> None:
        batching = BatchingConfig.model_validate(user_config)
        batching.apply_to(self.predict)
        self.predictor.warm_up(batching.max_batch_size)
