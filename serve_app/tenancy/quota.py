"""Quotas and fair scheduling, as plain objects: the one TenantGate replica holds the only instance.

Everything here runs on one event loop and never awaits between a check and its update, so a check
and its update are atomic: that is what makes quotas exact however many ingress replicas call in.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import NamedTuple

from serve_app.config.tenancy import RateLimitConfig, TenantConfig

__all__ = ["CONCURRENCY_RETRY_AFTER_S", "FairQueue", "Lease", "Quotas", "Refusal", "TokenBucket"]

# No request leaves before another ends, so "retry in a second" is a hint, not a promise.
CONCURRENCY_RETRY_AFTER_S = 1.0


class TokenBucket:
    def __init__(self, limit: RateLimitConfig, now: float):
        self.limit = limit
        self.tokens = float(limit.burst)
        self.updated = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be."""
        self.tokens = min(self.limit.burst, self.tokens + (now - self.updated) * self.limit.per_second)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.limit.per_second


class FairQueue:
    """Waiting requests: STAT ones first, in arrival order; then one per tenant in turn (round-robin).

    A tenant that floods the queue gets one turn per round like everyone else, so its backlog
    delays itself, not the others.
    """

    def __init__(self):
        self._stat: deque[Hashable] = deque()
        self._routine: dict[str, deque[Hashable]] = {}
        self._turns: deque[str] = deque()

    def __len__(self) -> int:
        return len(self._stat) + sum(len(q) for q in self._routine.values())

    def push(self, tenant_id: str, item: Hashable, stat: bool) -> None:
        if stat:
            self._stat.append(item)
            return
        if tenant_id not in self._routine:
            self._routine[tenant_id] = deque()
            self._turns.append(tenant_id)
        self._routine[tenant_id].append(item)

    def pop(self) -> Hashable:
        if self._stat:
            return self._stat.popleft()
        tenant_id = self._turns.popleft()
        waiting = self._routine[tenant_id]
        item = waiting.popleft()
        if waiting:
            self._turns.append(tenant_id)
        else:
            del self._routine[tenant_id]
        return item

    def remove(self, item: Hashable) -> bool:
        if item in self._stat:
            self._stat.remove(item)
            return True
        for tenant_id, waiting in self._routine.items():
            if item in waiting:
                waiting.remove(item)
                if not waiting:
                    del self._routine[tenant_id]
                    self._turns.remove(tenant_id)
                return True
        return False


class Lease(NamedTuple):
    """A request an ingress replica runs, as it renews it: enough for a gate that restarted to count it again."""

    ticket: str
    tenant_id: str
    holding: bool  # it holds a processing slot


@dataclass(frozen=True)
class Refusal:
    reason: str  # "rate" or "concurrency"
    retry_after_s: float


class Quotas:
    """Each tenant's rate and concurrency, and the cluster's processing slots, by request ticket."""

    def __init__(
        self,
        tenants: dict[str, TenantConfig],
        processing_slots: int,
        lease_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.tenants = tenants
        self.slots = processing_slots
        self.lease_s = lease_s
        self.clock = clock
        self.buckets = {tid: TokenBucket(t.rate, clock()) for tid, t in tenants.items()}
        self.in_flight = {tid: 0 for tid in tenants}
        self.admitted: dict[str, str] = {}  # ticket -> tenant id
        self.renewed: dict[str, float] = {}  # ticket -> when its ingress last said it is still running
        self.holding: set[str] = set()  # tickets holding a processing slot
        self.queue = FairQueue()
        self.waiting: dict[str, asyncio.Future] = {}
        self.ended: dict[str, float] = {}  # ticket -> when it left: a late renewal must not count it in again

    def admit(self, tenant_id: str, ticket: str) -> Refusal | None:
        """Count a request in, or say why not. Concurrency is checked first so a refusal costs no token."""
        self.expire()
        if self.in_flight[tenant_id] >= self.tenants[tenant_id].max_concurrent:
            return Refusal("concurrency", CONCURRENCY_RETRY_AFTER_S)
        wait = self.buckets[tenant_id].take(self.clock())
        if wait:
            return Refusal("rate", wait)
        self.in_flight[tenant_id] += 1
        self.admitted[ticket] = tenant_id
        self.renewed[ticket] = self.clock()
        return None

    def renew(self, tickets: list[str]) -> None:
        """The ingress replica holding these tickets is alive and they are still running."""
        now = self.clock()
        for ticket in tickets:
            if ticket in self.renewed:
                self.renewed[ticket] = now
        self.expire()

    def renew_leases(self, leases: list[Lease]) -> None:
        """``renew``, and count in those of the leases that these counts do not know: requests another gate let in
        before it was lost, still running. So a gate that restarts knows, once each ingress replica has renewed,
        every request in flight, and quotas hold across the restart."""
        for lease in leases:
            self.adopt(lease)
        self.renew([lease.ticket for lease in leases])

    def adopt(self, lease: Lease) -> None:
        """Count in a request these counts do not know (let in by a gate since lost), as it holds now; a slot it
        holds is counted even where that makes more than ``slots`` (it runs already). Not one that ended here."""
        if lease.ticket in self.admitted or lease.ticket in self.ended or lease.tenant_id not in self.in_flight:
            return
        self.admitted[lease.ticket] = lease.tenant_id
        self.in_flight[lease.tenant_id] += 1
        self.renewed[lease.ticket] = self.clock()
        if lease.holding:
            self.holding.add(lease.ticket)

    def expire(self) -> None:
        """Give back what requests hold whose ingress stopped renewing them: it died mid-request."""
        cutoff = self.clock() - self.lease_s
        for ticket in [t for t, renewed in self.renewed.items() if renewed < cutoff]:
            self.leave(ticket)
        for ticket in [t for t, ended in self.ended.items() if ended < cutoff]:
            del self.ended[ticket]

    async def acquire_slot(self, ticket: str, stat: bool, tenant_id: str | None = None) -> None:
        """Wait for a processing slot; the queue decides who is next (STAT, then tenants in turn). A ticket another
        gate let in (``tenant_id``'s) is counted in first."""
        if tenant_id is not None:
            self.adopt(Lease(ticket, tenant_id, holding=False))
        if ticket not in self.admitted:  # ended here already (its request cancelled): nothing to wait for
            return
        granted = asyncio.get_running_loop().create_future()
        self.waiting[ticket] = granted
        self.queue.push(self.admitted[ticket], ticket, stat)
        self._grant()
        try:
            await granted
        except asyncio.CancelledError:
            if self.queue.remove(ticket):
                del self.waiting[ticket]
            raise

    def leave(self, ticket: str) -> None:
        """The request ended, however it ended: give back its slot, its place in line, its count. Idempotent."""
        if self.queue.remove(ticket):
            self.waiting.pop(ticket).cancel()
        if ticket in self.holding:
            self.holding.discard(ticket)
            self._grant()
        tenant_id = self.admitted.pop(ticket, None)
        if tenant_id is not None:
            self.in_flight[tenant_id] -= 1
        self.renewed.pop(ticket, None)
        self.ended[ticket] = self.clock()

    def stats(self) -> dict:
        self.expire()
        return {"in_flight": dict(self.in_flight), "holding": len(self.holding), "queued": len(self.queue)}

    def _grant(self) -> None:
        while len(self.holding) < self.slots and len(self.queue):
            ticket = self.queue.pop()
            granted = self.waiting.pop(ticket)
            if not granted.done():  # cancelled, its waiter not yet woken to leave the queue
                granted.set_result(None)
                self.holding.add(ticket)
