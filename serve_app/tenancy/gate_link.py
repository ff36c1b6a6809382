"""An ingress replica's line to the ``TenantGate``: bounded waits, and a refusal at once while the gate is away.

The gate is one replica. When it is lost (its process killed, its node gone), Serve starts another in seconds; until
then a call to it waits for the new one, and every request that needs its quotas counted would wait with it. So a
request is refused instead (503 ``GateUnavailable``, Retry-After 1 s) as soon as this replica learns that the gate is
away: a call to it failed with the actor's death, or a request's admission went unanswered for
``scheduling.gate_timeout_s``. From then on this replica refuses such requests without asking the gate, and a probe
in the background asks it until it answers again, handing it first the leases of the requests this replica still
runs, so that a new gate counts them (``Quotas.renew_leases``) before this replica sends it anyone new.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app.errors import GateUnavailable
from serve_app.tenancy.quota import Lease, Refusal

__all__ = ["GATE_RETRY_AFTER_S", "GateLink"]

logger = logging.getLogger("ray.serve")

GATE_RETRY_AFTER_S = 1  # Serve replaces a lost gate in seconds; a client retrying each second is back soon after
_PROBE_PAUSE_S = 0.25  # between the probe's tries while the gate is away
# What a call to a gate that is gone raises (a bug of the gate's own comes as a RayTaskError: a 500, not this).
_GATE_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
# Until the gate has answered this replica once, a call may include the handle's own start (asking the controller
# where the gate is): a slow first answer is not a lost gate.
_FIRST_CALL_TIMEOUT_S = 30.0


class GateLink:
    """Calls to the gate for one ingress replica.

    Args:
        gate: the ``TenantGateDeployment`` handle.
        timeout_s: how long a call that should be instant (counting a request in or out) may take before the gate
            is taken for away.
        leases: what this replica's requests hold at the gate now (ticket, tenant, holds a slot), handed to a gate
            that answers again.
    """

    def __init__(self, gate: DeploymentHandle, timeout_s: float, leases: Callable[[], list[Lease]]):
        self.gate = gate
        self.timeout_s = timeout_s
        self.leases = leases
        self.answered = False  # the gate has answered this replica once
        self._away: asyncio.Event | None = None  # set while the gate is away; made on the replica's event loop
        self._probe: asyncio.Task | None = None

    @property
    def away(self) -> bool:
        return self._away is not None and self._away.is_set()

    async def admit(self, tenant_id: str, ticket: str) -> Refusal | None:
        return await self._ask(self._timeout_s(), "admit", tenant_id, ticket)

    async def acquire_slot(self, ticket: str, stat: bool, tenant_id: str) -> None:
        """Waits as long as the line ahead takes (no timeout), but not past the moment the gate is found away. The
        tenant goes with the ticket: a gate that restarted since it let the request in counts it in again."""
        await self._ask(None, "acquire_slot", ticket, stat, tenant_id)

    async def leave(self, ticket: str) -> None:
        """Count a request out. Detached, the call is not the request's child (Serve cancels a cancelled request's
        calls still waiting to be routed, and the count would leak until its lease ran out); shielded, it outlives
        the request's cancellation; bounded, a lost gate does not hold the answer. Sent even while the gate is away,
        not waited for then: a gate wrongly taken for away gets it, and a new gate learns that the request ended
        (a late renewal will not count it in again)."""
        leaving = _detached(self.gate.leave.remote, ticket)
        leaving.add_done_callback(_consume)
        if self.away:
            return
        try:
            await asyncio.wait_for(asyncio.shield(leaving), self._timeout_s())
        except TimeoutError:
            pass  # slow, not known to be gone: the call goes on, detached; an admission's timeout decides "away"
        except _GATE_GONE as e:
            self._lost(type(e).__name__)

    async def renew(self) -> None:
        """Renew this replica's leases (see SchedulingConfig.lease_s); the probe does it while the gate is away."""
        if not self.away:
            await self._ask(self._timeout_s(), "renew", self.leases(), lose_on_timeout=False)

    def _timeout_s(self) -> float:
        return self.timeout_s if self.answered else max(self.timeout_s, _FIRST_CALL_TIMEOUT_S)

    async def _ask(self, timeout_s: float | None, method: str, *args, lose_on_timeout: bool = True):
        """The gate's answer to ``method(*args)``; ``GateUnavailable`` at once while the gate is away, and as soon as
        it is found away (this call failing, or going unanswered for ``timeout_s`` where ``lose_on_timeout``, or
        another call)."""
        away = self._away_event()
        if away.is_set():
            raise _unavailable()
        response = getattr(self.gate, method).remote(*args)
        answer = asyncio.ensure_future(response)
        answer.add_done_callback(_consume)  # cancelled, it ends with Serve's RequestCancelledError: read, not logged
        gone = asyncio.ensure_future(away.wait())
        try:
            await asyncio.wait({answer, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():  # timed out, the gate found away by another call, or this request cancelled
                answer.cancel()
                response.cancel()
        if not answer.done() or answer.cancelled():
            if lose_on_timeout or away.is_set():
                self._lost(f"no answer in {timeout_s} s")
                raise _unavailable()
            raise TimeoutError(f"the tenant gate did not answer {method} in {timeout_s} s")
        try:
            result = answer.result()
        except _GATE_GONE as e:
            self._lost(type(e).__name__)
            raise _unavailable() from None
        self.answered = True
        return result

    def _away_event(self) -> asyncio.Event:
        if self._away is None:
            self._away = asyncio.Event()
        return self._away

    def _lost(self, why: str) -> None:
        away = self._away_event()
        if away.is_set():
            return
        away.set()
        # One line per loss, not one per refused request: each refusal is in the audit log and the metrics.
        logger.warning(
            "the tenant gate is away (%s): requests that need quotas are refused with 503 until it answers", why
        )
        self._probe = _detached(self._until_back)

    async def _until_back(self) -> None:
        """Ask the gate until it answers, handing it this replica's leases; then let requests through again."""
        while True:
            renewal = self.gate.renew.remote(self.leases())
            answer = asyncio.ensure_future(renewal)
            answer.add_done_callback(_consume)
            try:
                await asyncio.wait_for(answer, max(self.timeout_s, _PROBE_PAUSE_S))
                break
            except (TimeoutError, *_GATE_GONE):
                renewal.cancel()
            except Exception as e:  # Serve's own errors while the new replica starts: keep asking
                renewal.cancel()
                logger.debug("tenant gate probe: %s", type(e).__name__)
            await asyncio.sleep(_PROBE_PAUSE_S)
        self._away = asyncio.Event()
        logger.warning("the tenant gate answers again: requests are admitted")


def _unavailable() -> GateUnavailable:
    return GateUnavailable("the tenant gate that counts quotas is restarting; retry shortly", GATE_RETRY_AFTER_S)


def _detached(call, *args) -> asyncio.Task:
    """Run ``call(*args)`` as a task of its own, in an empty context: Serve takes a call made in a
    request's context for the request's child, and cancels it with the request."""

    async def run():
        return await call(*args)

    return asyncio.get_running_loop().create_task(run(), context=contextvars.Context())


def _consume(task: asyncio.Task) -> None:
    """A detached call's outcome, read so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
