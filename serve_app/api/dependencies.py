"""What the API's routers share: the services of the ingress replica that serves a request, as FastAPI dependencies,
and the reading of a request's parts that the services take.

Each ingress replica builds its own FastAPI app and sets its ``Services`` on that app's state
(``IngressDeployment.__serve_build_asgi_app__``); a route names what it needs by type::

    @router.get("/v1/results/{result_id}")
    async def result_summary(result_id: str, request: Request, gatekeeper: GatekeeperDep, results: ResultsDep):
        ...

No ``from __future__ import annotations``: FastAPI reads the dependencies from the real types.
"""

from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from ray.serve.handle import DeploymentHandle

from serve_app.api.inference_protocol import DataPlane
from serve_app.config import AppConfig
from serve_app.dicom_network.deliveries import DeliveriesService
from serve_app.dicom_network.stow_routing import StowRouting
from serve_app.dicomweb.service import DicomwebService
from serve_app.errors import InvalidRequestBody, PayloadTooLarge
from serve_app.model_repository import ModelRepository
from serve_app.results import ResultStore
from serve_app.results.service import ResultsService
from serve_app.segmentation.service import SegmentationService
from serve_app.segmentation.stage_handles import StageHandles
from serve_app.tenancy.gatekeeper import Gatekeeper
from serve_app.wsi.jobs import WsiJobs

__all__ = [
    "DataPlaneDep",
    "DeliveriesDep",
    "DicomwebDep",
    "GatekeeperDep",
    "RepositoryDep",
    "ResultsDep",
    "SegmentationDep",
    "Services",
    "StowRoutingDep",
    "WsiJobsDep",
    "declared_length",
    "json_body",
    "media_type",
    "result_path",
]

Body = TypeVar("Body", bound=BaseModel)
# A JSON body names a series or a PACS: a few hundred bytes. Anything near this is not one.
_MAX_JSON_BODY = 64 * 1024


@dataclass(frozen=True)
class Services:
    """What the routes of one ingress replica work with: the gatekeeper every API route passes, and one service per
    route family."""

    gatekeeper: Gatekeeper
    repository: ModelRepository  # as the application was built from it: the models it has deployments for
    segmentation: SegmentationService
    dicomweb: DicomwebService
    results: ResultsService
    wsi_jobs: WsiJobs
    deliveries: DeliveriesService
    stow_routing: StowRouting
    inference: DataPlane  # the Open Inference Protocol's, for its HTTP routes and its gRPC service

    @classmethod
    def of(
        cls,
        config: AppConfig,
        repository: ModelRepository,
        model_handles: dict[str, DeploymentHandle],
        tile_model_handles: dict[str, DeploymentHandle],
        preprocess: DeploymentHandle | None,
        postprocess: DeploymentHandle | None,
        gate: DeploymentHandle | None,
        dicom_node: DeploymentHandle | None = None,
    ) -> "Services":
        """The services of an application, over its deployments' handles (``IngressDeployment``'s arguments)."""
        results = ResultStore.of(config.storage)
        gatekeeper = Gatekeeper(config, repository, gate)
        stages = StageHandles(model_handles, preprocess, postprocess)
        deliveries = DeliveriesService(dicom_node)
        segmentation = SegmentationService(config, repository, stages, results, gatekeeper)
        return cls(
            gatekeeper=gatekeeper,
            repository=repository,
            segmentation=segmentation,
            dicomweb=DicomwebService(config, results),
            results=ResultsService(results),
            wsi_jobs=WsiJobs(config, repository, tile_model_handles, segmentation.rollouts),
            deliveries=deliveries,
            stow_routing=StowRouting(config, results, deliveries),
            inference=DataPlane(gatekeeper, repository, segmentation),
        )


def _services(request: Request) -> Services:
    return request.app.state.services


# async: FastAPI runs a plain function dependency in its thread pool, a thread hop per request for an attribute.
async def _gatekeeper(request: Request) -> Gatekeeper:
    return _services(request).gatekeeper


async def _repository(request: Request) -> ModelRepository:
    return _services(request).repository


async def _segmentation(request: Request) -> SegmentationService:
    return _services(request).segmentation


async def _dicomweb(request: Request) -> DicomwebService:
    return _services(request).dicomweb


async def _results(request: Request) -> ResultsService:
    return _services(request).results


async def _wsi_jobs(request: Request) -> WsiJobs:
    return _services(request).wsi_jobs


async def _deliveries(request: Request) -> DeliveriesService:
    return _services(request).deliveries


async def _stow_routing(request: Request) -> StowRouting:
    return _services(request).stow_routing


async def _inference(request: Request) -> DataPlane:
    return _services(request).inference


GatekeeperDep = Annotated[Gatekeeper, Depends(_gatekeeper)]
RepositoryDep = Annotated[ModelRepository, Depends(_repository)]
SegmentationDep = Annotated[SegmentationService, Depends(_segmentation)]
DicomwebDep = Annotated[DicomwebService, Depends(_dicomweb)]
ResultsDep = Annotated[ResultsService, Depends(_results)]
WsiJobsDep = Annotated[WsiJobs, Depends(_wsi_jobs)]
DeliveriesDep = Annotated[DeliveriesService, Depends(_deliveries)]
StowRoutingDep = Annotated[StowRouting, Depends(_stow_routing)]
DataPlaneDep = Annotated[DataPlane, Depends(_inference)]


async def json_body(request: Request, model: type[Body]) -> Body:
    """The request's JSON body as ``model``; 413 past ``_MAX_JSON_BODY``, 422 naming each field that does not fit
    (never its value). Read by a route once the gatekeeper has let the request in, not by FastAPI before."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_JSON_BODY:
            raise PayloadTooLarge(f"a JSON body is at most {_MAX_JSON_BODY} bytes")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise InvalidRequestBody(f"the JSON body is invalid ({problems})") from None


def media_type(request: Request) -> str:
    """The request's Content-Type without its parameters, lower case."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def declared_length(request: Request) -> int | None:
    """The body's length as its Content-Length declares it; None without one (a chunked body) or for one that is
    not a number (the bytes received are counted all the same)."""
    declared = request.headers.get("content-length")
    return int(declared) if declared and declared.isdigit() else None


def result_path(request: Request, result_id: str) -> str:
    """The path of a result's routes; root_path: the application's route prefix, when it is not served at /."""
    return f"{request.scope.get('root_path', '')}/v1/results/{result_id}"
