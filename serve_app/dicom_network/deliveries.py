"""``DeliveriesService``: the DICOM node's outbox as the HTTP API sees it, apart from HTTP.

The node runs in its own replica (``deployments/dicom_node.py``, Serve deployment ``DICOM_NODE``); an ingress
replica holds its handle. A tenant sees and resends its own deliveries only;
on a server without a DICOM node (no ``dicom_network`` section) there are none.
"""

from __future__ import annotations

from pydantic import BaseModel, Field
from ray.serve.handle import DeploymentHandle

from serve_app.dicom_network.outbox import Delivery, SeriesResult
from serve_app.errors import DeliveryNotFound

__all__ = ["DICOM_NODE", "DeliveriesService", "DeliveryList"]

DICOM_NODE = "DicomNode"  # the node's Serve deployment


class DeliveryList(BaseModel):
    """``GET /v1/deliveries``: the tenant's deliveries, the newest first."""

    deliveries: list[Delivery] = Field(description="Each result on its way to a destination, or sent, or given up.")


class DeliveriesService:
    """The outbox of one application's DICOM node.

    Args:
        node: the node's handle; None on a server without a DICOM node.
    """

    def __init__(self, node: DeploymentHandle | None):
        self.node = node

    async def of_tenant(self, tenant_id: str) -> DeliveryList:
        """The tenant's deliveries; none on a server without a node."""
        if self.node is None:
            return DeliveryList(deliveries=[])
        return DeliveryList(deliveries=await self.node.deliveries.remote(tenant_id))

    async def resend(self, delivery_id: str, tenant_id: str) -> Delivery:
        """Send the tenant's delivery again (pending at once); ``DeliveryNotFound`` (404) for another's or none."""
        if self.node is None:
            raise DeliveryNotFound("no such delivery: this server has no DICOM node")
        return await self.node.resend.remote(delivery_id, tenant_id)

    async def enqueue(self, result: SeriesResult, destinations: list[str]) -> list[Delivery]:
        """Hand a result to the node's outbox for ``destinations`` (none: nothing to do)."""
        if not destinations or self.node is None:
            return []
        return await self.node.enqueue.remote(result, destinations)
