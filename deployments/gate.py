"""TenantGate: the one place where tenants' quotas and the processing slots are counted, cluster-wide.

Exactly one replica, whatever the config says: every ingress replica asks this one, and its methods
are ``async`` so that they all run on its one event loop (Serve runs plain methods in a thread
pool), never interleaving inside a check-and-update.

If it is lost, Serve starts another. Meanwhile the ingress replicas refuse what needs quotas with 503 at once rather
than wait for it (``serve_app.tenancy.gate_link``); the new one starts with empty counts and learns the requests still
running from the leases each ingress replica renews (``renew``) or from their next call (``acquire_slot``), so quotas
hold across the restart. The token buckets start full again.
"""

from __future__ import annotations

from ray import serve

from deployments.replica import Replica
from serve_app.config import AppConfig
from serve_app.tenancy.quota import Lease, Quotas, Refusal


# Waiting callers hold a request open here, so it takes many more than the ingress replicas can send.
@serve.deployment(name="TenantGate", num_replicas=1, max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0})
class TenantGateDeployment(Replica):
    def __init__(self, config: AppConfig):
        self.quotas = Quotas(config.tenants, config.scheduling.processing_slots, config.scheduling.lease_s)

    async def admit(self, tenant_id: str, ticket: str) -> Refusal | None:
        return self.quotas.admit(tenant_id, ticket)

    async def acquire_slot(self, ticket: str, stat: bool, tenant_id: str | None = None) -> None:
        await self.quotas.acquire_slot(ticket, stat, tenant_id)

    async def leave(self, ticket: str) -> None:
        self.quotas.leave(ticket)

    async def renew(self, leases: list[Lease]) -> None:
        self.quotas.renew_leases([Lease(*lease) for lease in leases])

    async def stats(self) -> dict:
        return self.quotas.stats()
