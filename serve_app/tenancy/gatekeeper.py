"""What the ingress asks for each request: who sends it, may they, is there room; then the audit line.

Without a ``tenants`` section the server is open: every request is tenant "anonymous" and nothing is
refused here (the audit line is still written).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from serve_app.config import AppConfig
from serve_app.errors import CLIENT_CLOSED, Forbidden, TooManyRequests, Unauthorized, status_of, unwrap
from serve_app.model_repository import ModelRepository
from serve_app.stopwatch import Stopwatch
from serve_app.tenancy.audit import AuditLog
from serve_app.tenancy.config import TenantConfig
from serve_app.tenancy.keys import hash_api_key

__all__ = ["ANONYMOUS", "Gatekeeper", "Visit"]

logger = logging.getLogger("ray.serve")
ANONYMOUS = "anonymous"
_RESULT_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Visit:
    """One request as tenancy sees it; the ingress fills in what only it learns."""

    request_id: str
    route: str
    stat: bool
    tenant_id: str = ANONYMOUS
    model: str | None = None  # set only once the model is known to exist: never echo a client's string
    model_version: str | None = None
    max_upload_bytes: int = 0
    deadline_s: float = 0.0  # seconds the request may take from its arrival (the tenant's, else the server's)
    arrived: float = field(default_factory=time.monotonic)
    admitted: bool = False  # the gate counts it in: it must be let out (gate.leave)
    slot_wait_s: float = 0.0
    study_instance_uid: str | None = None  # hashed before it is written anywhere
    verdict: str | None = None  # a review's verdict, audited; never its reviewer or comment (free text)
    timings_ms: dict = field(default_factory=dict)
    gate: DeploymentHandle | None = None

    def seconds_left(self) -> float:
        """Of the request's deadline, counted from its arrival."""
        return self.deadline_s - (time.monotonic() - self.arrived)

    async def wait_for_slot(self) -> None:
        """Queue for a processing slot (STAT first, then tenants in turn); at once on an open server."""
        if self.admitted:
            watch = Stopwatch()
            await self.gate.acquire_slot.remote(self.request_id, self.stat)
            self.slot_wait_s = watch.total_s


class Gatekeeper:
    """The ingress's door: every API request passes through ``visit``.

    In order, each step a method of its own: ``_authenticate`` (API key -> tenant), ``_authorise``
    (model and STAT rights), ``_upload_limit`` (the tenant's or the server's), ``_admit`` (the tenant's
    rate and concurrency quotas, counted by the one ``TenantGateDeployment`` replica). Leaving, it gives
    back what the request held at the gate and writes the request's audit line, however it ended.

    Args:
        config: the application's config: ``tenants``, ``limits``, ``scheduling``, ``audit``.
        repository: the models, to check that a named model exists and learn its version.
        gate: the ``TenantGateDeployment`` handle; None on an open server (no tenants, nothing counted).
    """

    def __init__(self, config: AppConfig, repository: ModelRepository, gate: DeploymentHandle | None):
        self.tenants = config.tenants
        self.tenant_by_key = {h: tid for tid, tenant in config.tenants.items() for h in tenant.api_key_hashes}
        self.repository = repository
        self.gate = gate
        self.server_upload_limit = config.limits.max_upload_bytes
        self.server_deadline_s = config.limits.request_deadline_s
        self.audit = AuditLog(config.audit, config.storage.root, _replica_name())
        self.held: set[str] = set()  # tickets this replica holds at the gate, renewed while they run
        self.renew_every_s = config.scheduling.lease_s / 4
        self._renewing: asyncio.Task | None = None

    @asynccontextmanager
    async def visit(
        self,
        request: Request,
        route: str,
        model: str | None = None,
        version: str | None = None,
        stat: bool = False,
        admit: bool = False,
        result_id: str | None = None,
    ) -> AsyncIterator[Visit]:
        """Authenticate and authorise the request (and with ``admit``, count it against its quotas);
        whatever happens, release what it held and write its audit line."""
        watch = Stopwatch()
        visit = Visit(request_id=result_id or uuid.uuid4().hex, route=route, stat=stat, gate=self.gate)
        status, error = 200, None
        try:
            tenant = self._authenticate(visit, request)
            self._authorise(visit, tenant, model, version)
            visit.max_upload_bytes = self._upload_limit(tenant)
            visit.deadline_s = (tenant.request_deadline_s if tenant else None) or self.server_deadline_s
            if admit and self.gate is not None:
                await self._admit(visit)
            yield visit
        except BaseException as e:
            status, error = status_of(e), type(unwrap(e)).__name__
            raise
        finally:
            try:
                if visit.admitted:
                    # A client that hangs up cancels this request, and Serve then cancels the request's
                    # calls still waiting to be routed: a `leave` among them would never reach the gate
                    # and the tenant's count would leak until its lease ran out. Detached, the call is
                    # not this request's child; shielded, it outlives the cancellation.
                    self.held.discard(visit.request_id)
                    await asyncio.shield(_detached(self.gate.leave.remote, visit.request_id))
            finally:
                self.audit.write(self._record(visit, status, error, watch.total_s))

    async def _renew_held(self) -> None:
        """While this replica lives, tell the gate that its requests still run (see SchedulingConfig.lease_s)."""
        while True:
            await asyncio.sleep(self.renew_every_s)
            if self.held:
                try:
                    await self.gate.renew.remote(list(self.held))
                except Exception as e:  # the gate restarting: its counts start afresh anyway
                    logger.warning("could not renew the gate's leases: %s", type(e).__name__)

    def _authenticate(self, visit: Visit, request: Request) -> TenantConfig | None:
        """The tenant whose API key the request carries (None on an open server); 401 without a valid one."""
        tenant = None
        if self.tenants:
            key = request.headers.get("x-api-key") or _bearer_token(request.headers.get("authorization", ""))
            if not key:
                raise Unauthorized("an API key is required (Authorization: Bearer <key>, or X-API-Key)")
            tenant_id = self.tenant_by_key.get(hash_api_key(key))
            if tenant_id is None:
                raise Unauthorized("the API key is not valid")
            visit.tenant_id, tenant = tenant_id, self.tenants[tenant_id]
        request.state.tenant_id = visit.tenant_id  # the metrics label requests by it
        return tenant

    def authorise_model(self, visit: Visit, model: str) -> None:
        """For a model a request's body names, checked once the visit has authenticated it (a route that reads its
        body only then): 404 for an unknown model, 403 for one the visit's tenant may not use. The visit names it
        for the audit line once it is known to exist."""
        self._authorise(visit, self.tenants.get(visit.tenant_id), model, None)

    def _authorise(self, visit: Visit, tenant: TenantConfig | None, model: str | None, version: str | None) -> None:
        """404 for an unknown model or version (None: the newest); 403 for a model or a STAT request the tenant may
        not send."""
        if model is not None:
            visit.model_version = self.repository.get(model, version).version
            visit.model = model
            if tenant and not tenant.may_use(model):
                raise Forbidden(f"tenant {visit.tenant_id} may not use model {model}")
        if visit.stat and tenant and not tenant.stat:
            raise Forbidden(f"tenant {visit.tenant_id} may not send STAT requests")

    def _upload_limit(self, tenant: TenantConfig | None) -> int:
        """The tenant's upload limit, never above the server's."""
        tenant_limit = tenant.max_upload_bytes if tenant else None
        return min(self.server_upload_limit, tenant_limit or self.server_upload_limit)

    async def _admit(self, visit: Visit) -> None:
        """Count the request in at the gate, against its tenant's rate and concurrency; 429 if over."""
        if self._renewing is None:
            self._renewing = _detached(self._renew_held)
        visit.admitted = True  # set before the call: if it is cancelled, the gate may still have counted it in
        self.held.add(visit.request_id)
        refusal = await self.gate.admit.remote(visit.tenant_id, visit.request_id)
        if refusal is not None:
            visit.admitted = False
            self.held.discard(visit.request_id)
            raise TooManyRequests(f"tenant {visit.tenant_id} is over its {refusal.reason} quota", refusal.retry_after_s)

    def _record(self, visit: Visit, status: int, error: str | None, total_s: float) -> dict:
        outcome = (
            "ok"
            if status < 400
            else "cancelled"
            if status == CLIENT_CLOSED
            else "rejected"
            if status < 500
            else "failed"
        )
        return {
            "request_id": visit.request_id if _RESULT_ID.match(visit.request_id) else None,
            "tenant": visit.tenant_id,
            "route": visit.route,
            "model": visit.model,
            "model_version": visit.model_version,
            "stat": visit.stat,
            "study_hash": self.audit.study_hash(visit.study_instance_uid),
            "outcome": outcome,
            "status": status,
            "error": error,
            "timings_ms": {**visit.timings_ms, "total": round(total_s * 1000, 1)},
            "replica": self.audit.writer,
            **({"verdict": visit.verdict} if visit.verdict else {}),
        }


def _detached(call, *args) -> asyncio.Task:
    """Run ``call(*args)`` as a task of its own, in an empty context: Serve takes a call made in a
    request's context for the request's child, and cancels it with the request."""

    async def run():
        return await call(*args)

    return asyncio.get_running_loop().create_task(run(), context=contextvars.Context())


def _bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return f"pid{os.getpid()}"
