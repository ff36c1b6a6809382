"""What every medserve deployment shares: a private umask, ``ready`` for /readyz, and live retuning of batching."""

from __future__ import annotations

from serve_app.config import BatchingConfig
from serve_app.segmentation.stages import Predictor
from serve_app.storage import set_private_umask

__all__ = ["BatchingReplica", "Replica"]


class Replica:
    """Base of every deployment class: the ingress's /readyz calls ``ready`` on each deployment.

    Every replica writes patient data (uploads, results, the study's image, audit lines), so its process gets
    the umask 077 before its ``__init__`` runs. Set here in ``__new__``, which Serve calls on the class before
    ``__init__``: a deployment class that does not call ``super().__init__()`` is covered all the same.
    """

    def __new__(cls, *args, **kwargs):
        set_private_umask()
        return super().__new__(cls)

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
