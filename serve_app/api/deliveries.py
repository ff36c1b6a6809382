"""The DICOM node's deliveries: results on their way to a PACS, as the tenant whose results they are sees them. The
work is ``DeliveriesService``'s (``serve_app.dicom_network.deliveries``): the node's outbox, in its own replica."""

from fastapi import APIRouter, Request

from serve_app.api.dependencies import DeliveriesDep, GatekeeperDep
from serve_app.dicom_network.deliveries import DeliveryList
from serve_app.dicom_network.outbox import Delivery
from serve_app.responses import ERROR_RESPONSES

__all__ = ["router"]

router = APIRouter()


@router.get("/v1/deliveries", response_model=DeliveryList, responses=ERROR_RESPONSES)
async def list_deliveries(request: Request, gatekeeper: GatekeeperDep, deliveries: DeliveriesDep) -> DeliveryList:
    """The tenant's deliveries, the newest first: each result's destination, state (pending, delivered, failed),
    attempts and last error. Another tenant's are not listed."""
    async with gatekeeper.visit(request, "deliveries") as visit:
        return await deliveries.of_tenant(visit.tenant_id)


@router.post("/v1/deliveries/{delivery_id}/resend", response_model=Delivery, responses=ERROR_RESPONSES)
async def resend_delivery(
    delivery_id: str, request: Request, gatekeeper: GatekeeperDep, deliveries: DeliveriesDep
) -> Delivery:
    """Send a delivered or failed delivery again (it is pending at once; a pending one is left as it is); 404 for
    an unknown id or another tenant's."""
    async with gatekeeper.visit(request, "resend") as visit:
        return await deliveries.resend(delivery_id, visit.tenant_id)
