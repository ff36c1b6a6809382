"""DicomNodeDeployment: medserve's DICOM node (``serve_app.dicom_network``) as one Serve replica.

It listens for C-STORE and C-ECHO on the ``dicom_network`` port, routes each complete series to the models its
``routes`` name, runs them through the application's own stages (the same handles, gatekeeper and result store as
an HTTP request: ``SegmentationProcessor``) and delivers the DICOM SEG and SR from its outbox. One replica, as a
port is bound once per host; when it dies, Serve starts another (its health check fails when the listener or the
series watch has stopped), which carries on from the inbox and outbox on disk: nothing acknowledged is lost, and no
result is delivered twice.

The ingress reaches it by name (``DICOM_NODE``) for ``/v1/deliveries``, and hands it the results of STOW-RS pushes
that a route took, to deliver.
"""

from __future__ import annotations

import asyncio
import tempfile

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.replica import Replica
from serve_app.config import AppConfig
from serve_app.dicom_network.deliveries import DICOM_NODE
from serve_app.dicom_network.node import DicomNode
from serve_app.dicom_network.outbox import Delivery, SeriesResult
from serve_app.dicom_network.pipeline import SegmentationProcessor
from serve_app.errors import DeliveryNotFound
from serve_app.model_repository import ModelRepository
from serve_app.results import ResultStore
from serve_app.segmentation.service import SegmentationService
from serve_app.segmentation.stage_handles import StageHandles
from serve_app.tenancy.audit import AuditLog
from serve_app.tenancy.gatekeeper import Gatekeeper

__all__ = ["DicomNodeDeployment"]


# No CPU reserved: the node waits on the network, the disk and the stages' replicas; the stages do the work.
@serve.deployment(
    name=DICOM_NODE,
    num_replicas=1,
    max_ongoing_requests=64,
    health_check_period_s=5,
    ray_actor_options={"num_cpus": 0},
)
class DicomNodeDeployment(Replica):
    """The node of ``config`` (``dicom_network`` set), processing series through the application's stages."""

    async def __init__(
        self,
        config: AppConfig,
        repository: ModelRepository,
        model_handles: dict[str, DeploymentHandle],
        preprocess: DeploymentHandle | None = None,
        postprocess: DeploymentHandle | None = None,
        gate: DeploymentHandle | None = None,
    ):
        results = ResultStore.of(config.storage)
        gatekeeper = Gatekeeper(config, repository, gate)
        stages = StageHandles(model_handles, preprocess, postprocess)
        segmentation = SegmentationService(config, repository, stages, results, gatekeeper)
        processor = SegmentationProcessor(segmentation, gatekeeper, results, asyncio.get_running_loop())
        audit = AuditLog(config.audit, config.storage.root, gatekeeper.audit.writer)
        self.node = DicomNode(config, processor, audit)
        tempfile.tempdir = str(self.node.receiving)  # received instances are filed by a link (DicomNode.receiving)
        # Restoring the inbox reads every series' record: off the event loop, which the processor's calls need.
        await asyncio.to_thread(self.node.start)

    def check_health(self) -> None:
        """Serve calls it every few seconds; raising makes Serve replace the replica."""
        if not self.node.healthy():
            raise RuntimeError("the DICOM listener or the series watch has stopped")

    def port(self) -> int:
        """The port the listener is bound to."""
        return self.node.port

    def deliveries(self, tenant_id: str) -> list[Delivery]:
        """The tenant's deliveries, the newest first."""
        return self.node.outbox.deliveries(tenant_id)

    def resend(self, delivery_id: str, tenant_id: str) -> Delivery:
        """Send the tenant's delivery again; ``DeliveryNotFound`` (404) for another tenant's or none."""
        if not any(d.id == delivery_id for d in self.node.outbox.deliveries(tenant_id)):
            raise DeliveryNotFound("no such delivery")
        return self.node.outbox.resend(delivery_id)

    def enqueue(self, result: SeriesResult, destinations: list[str]) -> list[Delivery]:
        """Queue a result made elsewhere (a STOW-RS push a route took) for ``destinations``."""
        return [self.node.outbox.enqueue(result, destination) for destination in destinations]

    def __del__(self):
        node = getattr(self, "node", None)
        if node is not None:
            node.stop()
