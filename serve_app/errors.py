"""Errors that reach the client as a 4xx with a reason.

They are raised inside any deployment and cross DeploymentHandles intact (Ray re-raises
them as subclasses of the original class); the ingress turns them into JSON responses.
Messages must never carry patient data: they name what was wrong, not what was sent.
"""

import math


class RequestError(Exception):
    status_code = 400
    headers: dict[str, str] = {}  # extra response headers

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ModelNotFound(RequestError):
    status_code = 404


class PayloadTooLarge(RequestError):
    status_code = 413


class UnsupportedMediaType(RequestError):
    status_code = 415


class InvalidStudy(RequestError):
    """The upload is readable but is not one usable image series."""

    status_code = 422


class ResultNotFound(RequestError):
    status_code = 404


class Unauthorized(RequestError):
    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(RequestError):
    status_code = 403


class TooManyRequests(RequestError):
    """Over a tenant's rate or concurrency quota; the client may retry after ``retry_after_s``."""

    status_code = 429

    def __init__(self, reason: str, retry_after_s: float):
        super().__init__(reason, retry_after_s)  # both in args, so the error pickles

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.args[1])))}
