"""What every medserve deployment shares: a private umask, client errors logged as such, ``ready`` for /readyz, and
live retuning of batching."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from serve_app.config import BatchingConfig
from serve_app.errors import RequestError
from serve_app.storage import set_private_umask

if TYPE_CHECKING:  # only named here: the gate's and the tile model's replicas never import MONAI's stages
    from serve_app.segmentation.stages import Predictor

__all__ = ["BatchingReplica", "ClientErrorsAtWarning", "Replica"]

_SERVE_LOGGER = "ray.serve"  # Serve's logger, as its docs name it: the replica's log file and stderr


class ClientErrorsAtWarning(logging.Filter):
    """Serve logs every error a replica method raises as ``ERROR Request failed.`` with its traceback. A
    ``RequestError`` is the client's (a bad study, a slide that cannot be read): this filter turns its record into
    one WARNING line with the status and the reason, no traceback, so that ERROR means a fault of the server. The
    reasons name what was wrong, never what was sent (``serve_app/errors.py``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RequestError) and record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.msg, record.args = f"Request refused ({error.status_code}): {error.reason}", ()
            record.exc_info = record.exc_text = None
        return True


class Replica:
    """Base of every deployment class: the ingress's /readyz calls ``ready`` on each deployment.

    Every replica writes patient data (uploads, results, the study's image, audit lines), so its process gets
    the umask 077 before its ``__init__`` runs, and logs a client's error as a warning (``ClientErrorsAtWarning``).
    Set here in ``__new__``, which Serve calls on the class before ``__init__``: a deployment class that does not
    call ``super().__init__()`` is covered all the same.
    """

    def __new__(cls, *args, **kwargs):
        set_private_umask()
        serve_logger = logging.getLogger(_SERVE_LOGGER)
        if not any(isinstance(f, ClientErrorsAtWarning) for f in serve_logger.filters):
            serve_logger.addFilter(ClientErrorsAtWarning())
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
