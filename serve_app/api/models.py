"""The models' routes: what the server runs, for a client to pick from."""

import asyncio

from fastapi import APIRouter, Request

from serve_app.api.dependencies import GatekeeperDep, RepositoryDep, SegmentationDep
from serve_app.responses import ERROR_RESPONSES, ModelList, ModelSummary
from serve_app.segmentation.rollouts import RolloutReport

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request, gatekeeper: GatekeeperDep, repository: RepositoryDep) -> ModelList:
    async with gatekeeper.visit(request, "models"):
        models = [ModelSummary.of(repository.versions(name)) for name in repository.names()]
        return ModelList(models=models, refused=repository.refused)


@router.get("/v1/models/{name}", response_model=ModelSummary, responses=ERROR_RESPONSES)
async def describe_model(
    name: str, request: Request, gatekeeper: GatekeeperDep, repository: RepositoryDep
) -> ModelSummary:
    async with gatekeeper.visit(request, "models", model=name):
        return ModelSummary.of(repository.versions(name))


@router.get("/v1/models/{name}/rollout", response_model=RolloutReport, responses=ERROR_RESPONSES)
async def describe_rollout(
    name: str, request: Request, gatekeeper: GatekeeperDep, segmentation: SegmentationDep
) -> RolloutReport:
    """The model's rollout (``rollouts.<model>`` in the config; see the docs' Rollouts page): its mode and versions,
    the studies it routed, the mean agreement of the candidate with the live version over its window, and its state
    (running, promoted, aborted) with the reason. 404 for a model without one."""
    async with gatekeeper.visit(request, "rollout", model=name):
        return await asyncio.to_thread(segmentation.rollouts.report, name)
