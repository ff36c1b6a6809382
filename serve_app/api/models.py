"""The models' routes: what the server runs, for a client to pick from."""

from fastapi import APIRouter, Request

from serve_app.api.dependencies import GatekeeperDep, RepositoryDep
from serve_app.responses import ERROR_RESPONSES, ModelList, ModelSummary

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
