"""Token buckets, concurrency counts and the fair STAT-first queue, without a cluster."""

import asyncio

import pytest

from serve_app.config.tenancy import RateLimitConfig, TenantConfig
from serve_app.tenancy.quota import FairQueue, Quotas, TokenBucket


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tenant(per_second=1.0, burst=2, max_concurrent=10) -> TenantConfig:
    return TenantConfig(
        name="t",
        api_key_hashes=["sha256:" + "0" * 64],
        models=["*"],
        rate=RateLimitConfig(per_second=per_second, burst=burst),
        max_concurrent=max_concurrent,
    )


def test_token_bucket_allows_the_burst_then_the_rate():
    bucket = TokenBucket(RateLimitConfig(per_second=2, burst=3), now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token every half second
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert [bucket.take(100.0) for _ in range(4)][-1] > 0  # refills to the burst, not beyond


def test_fair_queue_serves_stat_first_then_tenants_in_turn():
    queue = FairQueue()
    for i in range(4):
        queue.push("flood", f"a{i}", stat=False)
    queue.push("calm", "b0", stat=False)
    queue.push("calm", "b1", stat=False)
    queue.push("er", "stat0", stat=True)
    assert queue.remove("a3") and not queue.remove("a3")
    assert [queue.pop() for _ in range(len(queue))] == ["stat0", "a0", "b0", "a1", "b1", "a2"]


def test_concurrency_is_checked_before_a_token_is_spent():
    clock = Clock()
    quotas = Quotas(
        {"h": _tenant(per_second=0.001, burst=2, max_concurrent=1)}, processing_slots=1, lease_s=60, clock=clock
    )
    assert quotas.admit("h", "r1") is None
    refusal = quotas.admit("h", "r2")
    assert refusal.reason == "concurrency"
    quotas.leave("r1")
    assert quotas.admit("h", "r3") is None  # the refused request did not take the second token
    quotas.leave("r3")
    refusal = quotas.admit("h", "r4")
    assert refusal.reason == "rate" and refusal.retry_after_s == pytest.approx(1000)


def test_slots_go_to_stat_first_and_are_given_back_on_leave_and_cancel():
    async def scenario():
        quotas = Quotas({"a": _tenant(), "b": _tenant()}, processing_slots=1, lease_s=60, clock=Clock())
        for ticket, tenant in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")]:
            quotas.admit(tenant, ticket)
        order = []

        async def run(ticket, stat=False):
            await quotas.acquire_slot(ticket, stat)
            order.append(ticket)

        first = asyncio.create_task(run("a1"))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(run("a2")), asyncio.create_task(run("b2", stat=True))]
        cancelled = asyncio.create_task(run("b1"))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(first, cancelled, return_exceptions=True)
        assert quotas.stats() == {"in_flight": {"a": 2, "b": 2}, "holding": 1, "queued": 2}
        for ticket in ["a1", "b1", "b2"]:
            quotas.leave(ticket)
            quotas.leave(ticket)  # idempotent
            await asyncio.sleep(0)
        await asyncio.gather(*waiting)
        quotas.leave("a2")
        assert order == ["a1", "b2", "a2"]
        assert quotas.stats() == {"in_flight": {"a": 0, "b": 0}, "holding": 0, "queued": 0}

    asyncio.run(scenario())


def test_counts_of_a_dead_ingress_are_given_back_when_their_lease_runs_out():
    async def scenario():
        clock = Clock()
        quotas = Quotas({"h": _tenant(max_concurrent=2)}, processing_slots=1, lease_s=60, clock=clock)
        assert quotas.admit("h", "alive") is None and quotas.admit("h", "dead") is None
        await quotas.acquire_slot("dead", stat=False)  # it died holding the slot
        waiting = asyncio.create_task(quotas.acquire_slot("alive", stat=False))
        await asyncio.sleep(0)
        assert quotas.admit("h", "third").reason == "concurrency"

        for _ in range(4):  # the live ingress renews its ticket every quarter lease; the dead one cannot
            clock.now += 20
            quotas.renew(["alive"])
        await asyncio.wait_for(waiting, timeout=1)  # the dead ticket's slot went to the live one
        assert quotas.stats() == {"in_flight": {"h": 1}, "holding": 1, "queued": 0}
        assert quotas.admit("h", "third") is None
        quotas.leave("alive")
        quotas.leave("third")
        assert quotas.stats() == {"in_flight": {"h": 0}, "holding": 0, "queued": 0}

    asyncio.run(scenario())
