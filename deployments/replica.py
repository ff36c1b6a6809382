"""What every medserve deployment shares: ``ready`` for /readyz, and live retuning of batching."""

from __future__ import annotations

from serve_app.config import BatchingConfig

__all__ = ["BatchingReplica", "Replica"]


class Replica:
    """Base of every deployment class: the ingress's /readyz calls ``ready`` on each deployment."""

    def ready(self) -> bool:
        return True


class BatchingReplica(Replica):
    """A replica whose ``predict`` is a ``@serve.batch`` method.

    Batching is the deployment's Serve ``user_config``: a config update retunes live replicas through
    ``reconfigure``, with no redeploy.
    """

    def reconfigure(self, user_config: dict) -> None:
        BatchingConfig.model_validate(user_config).apply_to(self.predict)
