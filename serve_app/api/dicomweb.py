"""The DICOMweb routes: medserve as a STOW-RS destination, a PACS pushing a series to be segmented by the model it
names (and, on the store-to route, getting the results back), or by the models the ``routes`` rules pick. The work
is ``SegmentationService``'s, ``DicomwebService``'s and ``StowRouting``'s."""

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve_app.api.dependencies import DicomwebDep, GatekeeperDep, SegmentationDep, StowRoutingDep, declared_length
from serve_app.api.segmentation import segmented
from serve_app.dicomweb.service import DicomwebService
from serve_app.dicomweb.stow import DICOM_JSON, StowBody
from serve_app.responses import ERROR_RESPONSES
from serve_app.segmentation.service import SegmentationService
from serve_app.tenancy.gatekeeper import Gatekeeper

__all__ = ["router"]

logger = logging.getLogger("ray.serve")

router = APIRouter()

_STOW_RESPONSES = {
    200: {"content": {DICOM_JSON: {}}, "description": "The STOW-RS answer; RetrieveURL: the result."},
    **ERROR_RESPONSES,
}


@router.post("/dicomweb/studies", response_class=JSONResponse, responses=_STOW_RESPONSES)
async def stow_routed(
    request: Request, gatekeeper: GatekeeperDep, segmentation: SegmentationDep, routing: StowRoutingDep
) -> JSONResponse:
    """STOW-RS naming no model: each series pushed goes to every model whose route it matches (the ``routes``
    rules, as for a series sent by C-STORE), each result to the route's destinations; a series no route takes is
    not processed. RetrieveURL: the first result; ``Medserve-Results``: every result's URL."""
    async with gatekeeper.visit(request, "stow-routed") as visit:
        body = StowBody(request.headers.get("content-type", ""), declared_length(request), request.stream())
        answers = []
        async with routing.spooled(body, visit) as pushed:
            for series, route in routing.taken(pushed):
                async with gatekeeper.visit(request, "stow", route.model, route.model_version, admit=True) as each:
                    answers.append(await segmented(request, segmentation, each, route.model, series.receive))
                await routing.deliver(series, route, answers[-1], visit.tenant_id)
    return _stow_answer(request, body, [answer.result_id for answer in answers])


@router.post("/dicomweb/{model}/studies", response_class=JSONResponse, responses=_STOW_RESPONSES)
async def stow(
    model: str, request: Request, gatekeeper: GatekeeperDep, segmentation: SegmentationDep, dicomweb: DicomwebDep
) -> JSONResponse:
    """STOW-RS: a PACS pushes one series (``multipart/related; type="application/dicom"``) to be segmented
    by ``model``; the answer lists the instances, and its RetrieveURL (and Location) is the result."""
    return await _stow(request, model, None, gatekeeper, segmentation, dicomweb)


@router.post("/dicomweb/{model}/store-to/{pacs}/studies", response_class=JSONResponse, responses=_STOW_RESPONSES)
async def stow_and_store_back(
    model: str,
    pacs: str,
    request: Request,
    gatekeeper: GatekeeperDep,
    segmentation: SegmentationDep,
    dicomweb: DicomwebDep,
) -> JSONResponse:
    """STOW-RS as ``stow``, then the result's SEG and SR stored to the configured PACS ``pacs``: a PACS that
    pushes a series here gets the results back without anyone asking (a failed store is logged, and the
    result stays downloadable)."""
    return await _stow(request, model, pacs, gatekeeper, segmentation, dicomweb)


async def _stow(
    request: Request,
    model: str,
    store_to: str | None,
    gatekeeper: Gatekeeper,
    segmentation: SegmentationService,
    dicomweb: DicomwebService,
) -> JSONResponse:
    async with gatekeeper.visit(request, "stow", model=model, admit=True) as visit:
        pacs = None if store_to is None else dicomweb.pacs_of(store_to, visit.tenant_id)
        body = StowBody(request.headers.get("content-type", ""), declared_length(request), request.stream())
        answer = await segmented(request, segmentation, visit, model, body.receive)
        if pacs is not None:
            outcome = await dicomweb.store_back(pacs, answer, visit.tenant_id)
            if not outcome.stored:
                logger.warning("result %s: store-back failed: %s", answer.result_id, outcome.reason)
    return _stow_answer(request, body, [answer.result_id])


def _stow_answer(request: Request, body: StowBody, result_ids: list[str]) -> JSONResponse:
    """The STOW-RS answer: RetrieveURL and Location the first result's (none when no route took the push), every
    result's URL in ``Medserve-Results``."""
    urls = [f"{str(request.base_url).rstrip('/')}/v1/results/{result_id}" for result_id in result_ids]
    headers = {"Location": urls[0], "Medserve-Results": ", ".join(urls)} if urls else {}
    return JSONResponse(body.answer(urls[0] if urls else None), media_type=DICOM_JSON, headers=headers)
