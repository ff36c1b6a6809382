"""IngressDeployment: the HTTP API's replica.

The routes are the route families' routers (``serve_app.api``), their work the families' services. What every
answer shares is here: the Host check, the drain, the web headers and the response counter (ASGI middleware), one
error format whoever raised the error, and the health routes. Each replica builds its own FastAPI app
(``__serve_build_asgi_app__``) and keeps its state on it: its services, its drain watch, its allowed hosts.

No `from __future__ import annotations` here: FastAPI must see real types.
"""

import asyncio
import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle
from starlette import types as asgi
from starlette.exceptions import HTTPException

from deployments.replica import Replica
from serve_app.api import ROUTERS, STATIC_PREFIXES, SegmentationDep, Services, add_pages
from serve_app.api.v2_grpc import InferenceServiceMethods, serve_grpc_where_http_listens
from serve_app.config import AppConfig
from serve_app.drain import DrainGate, DrainWatch
from serve_app.errors import (
    SHUTDOWN_RETRY_S,
    BadRequest,
    MethodNotAllowed,
    RequestError,
    RouteNotFound,
    ShuttingDown,
    status_of,
    unwrap,
)
from serve_app.http_security import SECURITY_HEADERS, HostAllowList, SecurityHeaders
from serve_app.model_repository import ModelRepository
from serve_app.observability import metrics
from serve_app.responses import ErrorDetail, ErrorResponse, Health, Readiness
from serve_app.retention import RetentionSweeper

logger = logging.getLogger("ray.serve")


def _error_response(status: int, reason: str, headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(status=status, reason=reason))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _refusal(error: RequestError) -> JSONResponse:
    """The answer to a request a middleware refuses before any route runs."""
    return _error_response(error.status_code, error.reason, error.headers)


def _shutting_down() -> JSONResponse:
    return _refusal(ShuttingDown("medserve is shutting down; retry shortly", SHUTDOWN_RETRY_S))


_DISCONNECT_OPT_OUT = b"x-request-disconnect-disabled"


class RefuseDisconnectOptOut:
    """ASGI middleware of the ingress: a request that asks Serve not to watch for its client going away
    (``x-request-disconnect-disabled: ?1``) is answered 400 before any of its body is read.

    Serve honours that header from any client, and then hands the request code its HTTP server's own receive, which
    works only on the server's event loop. The ingress's code runs on a second thread's loop (Serve's default), where
    an upload too large to arrive at once hung, holding its place.
    """

    def __init__(self, app: asgi.ASGIApp):
        self.app = app

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "http" and (_DISCONNECT_OPT_OUT, b"?1") in map(tuple, scope["headers"]):
            error = BadRequest("the x-request-disconnect-disabled header is not accepted; send the request without it")
            await _refusal(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


# Every error leaves in one format, {"error": {"status", "reason"}}, whoever raised it: medserve, a stage
# behind a handle (wrapped by Ray), or FastAPI and Starlette themselves (unknown routes, bad query values).
# Exception's handler runs outermost, for what nothing else answers (Starlette re-raises it, to be logged).
async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    error = unwrap(exc)
    if isinstance(error, RequestError):
        return _error_response(error.status_code, error.reason, error.headers)
    logger.error("request failed: %s", type(error).__name__)  # the class only: a message may quote what was sent
    # Starlette answers an error no other handler takes outside every middleware: the web headers go on here.
    return _error_response(status_of(error), "internal error in a processing stage", SECURITY_HEADERS)


async def _framework_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return await _any_error(request, RouteNotFound("no such route; see /docs for the API"))
    if exc.status_code == 405:
        return await _any_error(request, MethodNotAllowed(f"method {request.method} is not allowed on this route"))
    return _error_response(exc.status_code, str(exc.detail), exc.headers)


async def _invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    # pydantic's messages name the parameter and the expected type, never the value sent.
    problems = "; ".join(f"{' '.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return await _any_error(request, BadRequest(f"invalid request parameters ({problems})"))


_health = APIRouter()


@_health.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@_health.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(segmentation: SegmentationDep):
    try:
        await asyncio.wait_for(segmentation.ready(), timeout=5)
    except Exception:
        return JSONResponse(Readiness(status="not ready").model_dump(), status_code=503)
    return Readiness(status="ready", models=segmentation.models)


def build_api() -> FastAPI:
    """The HTTP API: its routes, middleware and error handlers. What the routes and middleware work with is the
    replica's, set on the app's state (``IngressDeployment.__serve_build_asgi_app__``)."""
    api = FastAPI(
        title="medserve",
        description="Segmentation of CT/MR studies on a Ray Serve cluster.",
        docs_url=None,
        redoc_url=None,
    )
    add_pages(api)
    api.include_router(_health)
    for router in ROUTERS:
        api.include_router(router)
    # Outermost last. While medserve down drains the application, a new POST is refused and what is in flight is
    # counted until it is done. A request for a host the application does not answer for is refused before anything
    # else reads it. The response counter counts every refusal; the web headers go on every answer, refusals
    # included.
    api.add_middleware(DrainGate, refusal=_shutting_down)
    api.add_middleware(RefuseDisconnectOptOut)
    api.add_middleware(HostAllowList, refusal=_refusal)
    metrics.instrument(api)
    api.add_middleware(SecurityHeaders, cacheable=STATIC_PREFIXES)
    for error in (Exception, RayTaskError, RequestError):
        api.add_exception_handler(error, _any_error)
    api.add_exception_handler(HTTPException, _framework_error)
    api.add_exception_handler(RequestValidationError, _invalid_parameter)
    return api


# Serve serialises the class when it is decorated: everything it uses must be defined above it.
@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment(Replica, InferenceServiceMethods):
    """The HTTP API's replica: ``config``'s application, over its deployments' handles (see ``serve_app.app``); with
    ``grpc.enabled``, also the Open Inference Protocol's gRPC service, whose RPCs are methods of this class
    (``InferenceServiceMethods``)."""

    def __init__(
        self,
        config: AppConfig,
        repository: ModelRepository,
        model_handles: dict[str, DeploymentHandle],
        tile_model_handles: dict[str, DeploymentHandle],
        preprocess: DeploymentHandle | None = None,
        postprocess: DeploymentHandle | None = None,
        gate: DeploymentHandle | None = None,
        dicom_node: DeploymentHandle | None = None,
    ):
        self.services = Services.of(
            config, repository, model_handles, tile_model_handles, preprocess, postprocess, gate, dicom_node
        )
        self.drain = DrainWatch(config, serve.get_replica_context().replica_id.unique_id)
        self.allowed_hosts = config.http.host_allow_list()
        # Whether Serve runs gRPC is the cluster's (serve.start), not this application's: set it up whatever the config.
        serve_grpc_where_http_listens(config.http.host, config.grpc.max_receive_message_length)
        # Expired results and WSI files deleted on a timer, whether requests come or not (every replica sweeps).
        self.sweeper = RetentionSweeper(config).start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """This replica's app, which Serve asks for once ``__init__`` has run: the routes find the replica's
        services on its state, the middleware its drain watch and allowed hosts."""
        api = build_api()
        api.state.services, api.state.drain, api.state.allowed_hosts = self.services, self.drain, self.allowed_hosts
        return api
