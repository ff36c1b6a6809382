"""Errors that reach the client as a 4xx with a reason, and the one place where other errors are translated; and
the DICOM network's, which reach a sender as a DIMSE status or a delivery's last error.

They are raised inside any deployment and cross DeploymentHandles intact (Ray re-raises
them as subclasses of the original class); the ingress turns them into JSON responses.
Messages must never carry patient data: they name what was wrong, not what was sent (no UIDs either).
"""

import asyncio
import math

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.requests import ClientDisconnect

__all__ = [
    "CLIENT_CLOSED",
    "BadRequest",
    "CandidateNotDeliverable",
    "Conflict",
    "DeadlineExceeded",
    "DeliveryFailed",
    "DeliveryNotFound",
    "DimseStatus",
    "Forbidden",
    "GateUnavailable",
    "HostNotAllowed",
    "ImageNotKept",
    "InstanceRefused",
    "InvalidRequestBody",
    "InconsistentPyramid",
    "InvalidSlide",
    "InvalidStudy",
    "InvalidTensor",
    "ModelTaskMismatch",
    "MethodNotAllowed",
    "ModelNotFound",
    "NoDicomResult",
    "NoRollout",
    "NotFoundAtPacs",
    "PacsFailed",
    "PayloadTooLarge",
    "ReplicaLost",
    "RequestError",
    "ResultNotFound",
    "SHUTDOWN_RETRY_S",
    "ServiceBusy",
    "ShuttingDown",
    "RouteNotFound",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedContentEncoding",
    "UnsupportedMediaType",
    "status_of",
    "unwrap",
]

# nginx's code for a client that went away before the answer: counted and audited as such, not as a 500.
CLIENT_CLOSED = 499


class RequestError(Exception):
    status_code = 400
    headers: dict[str, str] = {}  # extra response headers

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class BadRequest(RequestError):
    """The request itself is malformed: a query parameter of the wrong type, a broken multipart body."""

    status_code = 400


class HostNotAllowed(BadRequest):
    """The request's Host header names a host the server does not answer for (``http.allowed_hosts``): a page of
    another site reaching it through DNS rebinding, or a proxy in front that does not pass the Host on."""


class InvalidTensor(BadRequest):
    """A tensor of an inference-protocol request (``/v2/models/{name}/infer``) that the model does not take: an
    unknown or missing input, a datatype or shape it does not accept, data of another size than its shape's."""


class Conflict(RequestError):
    """The request clashes with work in progress, e.g. a WSI job into an output folder another job is writing."""

    status_code = 409


class ModelNotFound(RequestError):
    status_code = 404


class RouteNotFound(RequestError):
    status_code = 404


class MethodNotAllowed(RequestError):
    status_code = 405


class PayloadTooLarge(RequestError):
    status_code = 413


class UnsupportedMediaType(RequestError):
    status_code = 415


class UnsupportedContentEncoding(UnsupportedMediaType):
    """A body compressed in a coding this server does not decode; the answer's Accept-Encoding lists those it does
    (RFC 7694)."""

    headers = {"Accept-Encoding": "gzip, zstd"}


class InvalidStudy(RequestError):
    """The upload is readable but is not one usable image series."""

    status_code = 422


class InvalidRequestBody(RequestError):
    """A JSON body that does not fit its route's schema, or names a PACS this server does not have."""

    status_code = 422


class InvalidSlide(RequestError):
    """A whole-slide image that cannot be used: unreadable, truncated, not a tiled pyramid, no resolution.

    In a WSI job it fails that one slide (its reason is the slide's error in the job's status), not the job.
    """

    status_code = 422


class InconsistentPyramid(InvalidSlide):
    """A slide whose pyramid levels are not one image (another frame of reference, another shape): no other reader
    is tried, since one that opens it would read a wrong image."""


class ModelTaskMismatch(RequestError):
    """A segmentation model asked for a WSI job, or a tile classifier asked to segment a study."""

    status_code = 422


class ResultNotFound(RequestError):
    status_code = 404


class DeliveryNotFound(RequestError):
    """No delivery of the tenant's outbox has this id (another tenant's is not found either)."""

    status_code = 404


class NoDicomResult(RequestError):
    """A DICOM SEG or SR asked of a result whose study was NIfTI: it has no source instances to reference.

    404, not 409: the document does not exist and never will (its URL is null in the result's answer), and no
    change of state lets a retry succeed, which a 409 would suggest. The reason tells it from an unknown result.
    """

    status_code = 404


class NoRollout(RequestError):
    """A model that has no rollout configured (``rollouts.<model>``): nothing to report, promote or abort."""

    status_code = 404


class CandidateNotDeliverable(RequestError):
    """A shadow result, a candidate version's run beside the live answer: kept for review, never sent to a PACS."""

    status_code = 409


class ImageNotKept(RequestError):
    """The study's image asked of a result whose request did not ask to keep it (``keep_image``): it was never
    stored, and asking again will not make it. The reason tells it from an unknown result."""

    status_code = 404


class Unauthorized(RequestError):
    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(RequestError):
    status_code = 403


class _RetryLater(RequestError):
    """A refusal the client may retry after ``retry_after_s`` (its Retry-After header)."""

    def __init__(self, reason: str, retry_after_s: float):
        super().__init__(reason, retry_after_s)  # both in args, so the error pickles

    @property
    def headers(self) -> dict[str, str]:
        return _retry_after(self.args[1])


class TooManyRequests(_RetryLater):
    """Over a tenant's rate or concurrency quota."""

    status_code = 429


class NotFoundAtPacs(RequestError):
    """A configured PACS has no such study or series."""

    status_code = 404


class PacsFailed(RequestError):
    """A configured PACS that cannot be reached, drops the connection or answers with an error: 503 when it
    cannot be reached (or not in time), 502 when it answers badly. The client may retry after ``retry_after_s``.

    ``transient``: whether trying again soon may work (the PACS busy or restarting, not refusing the request).
    """

    def __init__(self, reason: str, status_code: int, retry_after_s: float, transient: bool = False):
        super().__init__(reason, status_code, retry_after_s, transient)  # all in args, so the error pickles

    @property
    def status_code(self) -> int:
        return self.args[1]

    @property
    def transient(self) -> bool:
        return self.args[3]

    @property
    def headers(self) -> dict[str, str]:
        return _retry_after(self.args[2])


class DeadlineExceeded(RequestError):
    """The request took longer than its deadline (``limits.request_deadline_s``, or its tenant's); its work was
    cancelled in every stage."""

    status_code = 504


class ServiceBusy(_RetryLater):
    """Every replica of a stage is busy and its queue full (``max_queued_requests``): refused at once rather than
    left to wait without bound."""

    status_code = 503


class ReplicaLost(_RetryLater):
    """The replica holding the request died (its process killed, its node lost) and so did the one that took the
    request's second attempt: Serve is starting others, so the client may retry shortly."""

    status_code = 503


class GateUnavailable(_RetryLater):
    """The tenant gate, which counts every tenant's quotas, does not answer (its replica lost and being replaced, or
    too slow): a request that needs its quotas counted is refused at once rather than left to wait for it."""

    status_code = 503


class ShuttingDown(_RetryLater):
    """The application is draining before it stops (``medserve down``): requests in flight finish, new work is
    refused."""

    status_code = 503


# What a client is told to wait when the application is stopping: long enough for it to come back, or for a load
# balancer in front to stop sending here.
SHUTDOWN_RETRY_S = 5

# What a client is told to wait when a stage's queue is full, or its replica was lost: about one model batch's
# time; Serve starts a replacement replica in seconds.
BUSY_RETRY_AFTER_S = 1


def _retry_after(seconds: float) -> dict[str, str]:
    """The Retry-After header: whole seconds, at least one."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def unwrap(error: BaseException) -> BaseException:
    """The error a stage raised, out of the ``RayTaskError`` Ray wraps it in when it crosses a handle; Serve's
    refusal of a request its full queue cannot take (``BackPressureError``) as a ``ServiceBusy``; the death of the
    replica that held it (``RayActorError``) as a ``ReplicaLost``."""
    if isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    if isinstance(error, BackPressureError):
        return ServiceBusy("every replica is busy and its queue is full; retry shortly", BUSY_RETRY_AFTER_S)
    if isinstance(error, RayActorError):
        return ReplicaLost("the replica processing the request was lost; retry shortly", BUSY_RETRY_AFTER_S)
    return error


def status_of(error: BaseException) -> int:
    """The HTTP status a request that raised ``error`` ends with: a ``RequestError``'s own, 499 for a
    client that hung up (the request was cancelled), else 500."""
    error = unwrap(error)
    if isinstance(error, RequestError):
        return error.status_code
    if isinstance(error, (asyncio.CancelledError, ClientDisconnect)):
        return CLIENT_CLOSED
    return 500


# The DICOM network's (``serve_app.dicom_network``): not HTTP errors.


class DimseStatus:
    """C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C) the DICOM node answers."""

    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


class InstanceRefused(Exception):
    """A C-STORE that the DICOM node does not store: answered with ``status`` (a ``DimseStatus``), the reason
    audited."""

    def __init__(self, reason: str, status: int):
        super().__init__(reason, status)
        self.reason, self.status = reason, status


class DeliveryFailed(Exception):
    """A destination that could not take a result. ``transient``: it may take it on a later try (down, busy);
    otherwise it refused it and another try would be refused the same."""

    def __init__(self, reason: str, transient: bool):
        super().__init__(reason, transient)
        self.reason, self.transient = reason, transient
