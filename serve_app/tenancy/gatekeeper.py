"""What the API asks for each request: who sends it, may they, is there room; then the audit line.

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
from serve_app.config.tenancy import TenantConfig
from serve_app.errors import CLIENT_CLOSED, Forbidden, TooManyRequests, Unauthorized, status_of, unwrap
from serve_app.model_repository import ModelRepository
from serve_app.stopwatch import Stopwatch
from serve_app.tenancy.audit import AuditLog
from serve_app.tenancy.gate_link import GateLink
from serve_app.tenancy.keys import hash_api_key
from serve_app.tenancy.quota import Lease

__all__ = ["ANONYMOUS", "Gatekeeper", "Visit"]

logger = logging.getLogger("ray.serve")
ANONYMOUS = "anonymous"
_RESULT_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Visit:
    """One request the gatekeeper let in, as its route and the services see it. What they learn that the audit line
    tells (a study, a review) they hand to the gatekeeper (``Gatekeeper.segmented``, ``Gatekeeper.reviewed``), which
    alone writes the line."""

    request_id: str
    tenant_id: str
    model_version: str | None  # of the model the route names: the version it names, else the newest
    version_named: bool  # the route named the version: no rollout picks another
    max_upload_bytes: int
    deadline_s: float  # seconds the request may take from its arrival (the tenant's, else the server's)
    _record: _VisitRecord = field(repr=False)

    def seconds_left(self) -> float:
        """Of the request's deadline, counted from its arrival."""
        return self.deadline_s - (time.monotonic() - self._record.arrived)


@dataclass
class _VisitRecord:
    """What the audit line says of one request beyond how it ended, filled in by the gatekeeper as it learns it."""

    request_id: str
    route: str
    stat: bool
    tenant_id: str = ANONYMOUS
    model: str | None = None  # set only once the model is known to exist: never echo a client's string
    model_version: str | None = None
    arrived: float = field(default_factory=time.monotonic)
    admitted: bool = False  # the gate counts it in: it must be let out (gate.leave)
    holding: bool = False  # it holds a processing slot at the gate
    slot_wait_s: float = 0.0
    study_instance_uid: str | None = None  # hashed before it is written anywhere
    verdict: str | None = None  # a review's verdict, audited; never its reviewer or comment (free text)
    timings_ms: dict = field(default_factory=dict)


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
        self.held: dict[str, _VisitRecord] = {}  # requests this replica holds at the gate, renewed while they run
        self.gate_link = GateLink(gate, config.scheduling.gate_timeout_s, self._leases) if gate is not None else None
        self.renew_every_s = config.scheduling.lease_s / 4
        self._renewing: asyncio.Task | None = None

    @asynccontextmanager
    async def visit(
        self,
        request: Request | None,
        route: str,
        model: str | None = None,
        version: str | None = None,
        stat: bool = False,
        admit: bool = False,
        result_id: str | None = None,
        tenant_id: str | None = None,
    ) -> AsyncIterator[Visit]:
        """Authenticate and authorise the request (and with ``admit``, count it against its quotas);
        whatever happens, release what it held and write its audit line. A request that came by DICOM, not HTTP
        (``request`` None), is ``tenant_id``'s: the called AE title it was sent to names its tenant."""
        watch = Stopwatch()
        record = _VisitRecord(request_id=result_id or uuid.uuid4().hex, route=route, stat=stat)
        status, error = 200, None
        try:
            tenant = self._authenticate(record, request, tenant_id)
            self._authorise(record, tenant, model, version)
            deadline_s = (tenant.request_deadline_s if tenant else None) or self.server_deadline_s
            if admit and self.gate is not None:
                await self._admit(record)
            yield Visit(
                request_id=record.request_id,
                tenant_id=record.tenant_id,
                model_version=record.model_version,
                version_named=version is not None,
                max_upload_bytes=self._upload_limit(tenant),
                deadline_s=deadline_s,
                _record=record,
            )
        except BaseException as e:
            status, error = status_of(e), type(unwrap(e)).__name__
            raise
        finally:
            try:
                if record.admitted:
                    # Detached from the request and shielded (a client that hangs up cancels the request and
                    # its calls), bounded while the gate is away: see GateLink.leave.
                    self.held.pop(record.request_id, None)
                    await self.gate_link.leave(record.request_id)
            finally:
                self.audit.write(self._audit_line(record, status, error, watch.total_s))

    async def wait_for_slot(self, visit: Visit) -> None:
        """Queue for a processing slot (STAT first, then tenants in turn); at once on an open server. The wait is
        audited as the request's queue time."""
        record = visit._record
        if record.admitted:
            watch = Stopwatch()
            await self.gate_link.acquire_slot(record.request_id, record.stat, record.tenant_id)
            record.holding = True
            record.slot_wait_s = watch.total_s

    def authorise_model(self, visit: Visit, model: str) -> None:
        """For a model a request's body names, checked once the visit has authenticated it (a route that reads its
        body only then): 404 for an unknown model, 403 for one the visit's tenant may not use. The audit line names
        it once it is known to exist."""
        self._authorise(visit._record, self.tenants.get(visit.tenant_id), model, None)

    def segmented(self, visit: Visit, study_instance_uid: str | None, timings_ms: dict[str, float]) -> None:
        """For the audit line of a visit that segmented a study: the study (hashed when written) and the
        milliseconds of each stage; the queue's, waited in ``wait_for_slot``, is added here."""
        record = visit._record
        record.study_instance_uid = study_instance_uid
        record.timings_ms = {**timings_ms, "queue": round(record.slot_wait_s * 1000, 1)}

    def routed(self, visit: Visit, model_version: str) -> None:
        """For the audit line of a visit whose study a model's rollout gave to ``model_version`` (the live or the
        candidate version) rather than the newest."""
        visit._record.model_version = model_version

    def reviewed(self, visit: Visit, model: str | None, model_version: str | None, verdict: str) -> None:
        """For the audit line of a visit that reviewed a result: the result's model and version (its own record of
        them, never what the client sent) and the verdict; never the reviewer or the comment."""
        record = visit._record
        record.model, record.model_version, record.verdict = model, model_version, verdict

    async def _renew_held(self) -> None:
        """While this replica lives, tell the gate that its requests still run (see SchedulingConfig.lease_s)."""
        while True:
            await asyncio.sleep(self.renew_every_s)
            if self.held:
                try:
                    await self.gate_link.renew()
                except Exception as e:  # the gate away: the link hands it the leases when it is back
                    logger.debug("could not renew the gate's leases: %s", type(e).__name__)

    def _leases(self) -> list[Lease]:
        """What this replica's requests hold at the gate now, for a renewal."""
        return [Lease(ticket, r.tenant_id, r.holding) for ticket, r in list(self.held.items())]

    def _authenticate(
        self, record: _VisitRecord, request: Request | None, tenant_id: str | None
    ) -> TenantConfig | None:
        """The tenant whose API key the request carries (None on an open server); 401 without a valid one."""
        if request is None:  # by DICOM: the called AE title's tenant, checked against the config at start
            record.tenant_id = tenant_id or ANONYMOUS
            return self.tenants.get(record.tenant_id)
        tenant = None
        if self.tenants:
            key = request.headers.get("x-api-key") or _bearer_token(request.headers.get("authorization", ""))
            if not key:
                raise Unauthorized("an API key is required (Authorization: Bearer <key>, or X-API-Key)")
            tenant_id = self.tenant_by_key.get(hash_api_key(key))
            if tenant_id is None:
                raise Unauthorized("the API key is not valid")
            record.tenant_id, tenant = tenant_id, self.tenants[tenant_id]
        request.state.tenant_id = record.tenant_id  # the metrics label requests by it
        return tenant

    def _authorise(
        self, record: _VisitRecord, tenant: TenantConfig | None, model: str | None, version: str | None
    ) -> None:
        """404 for an unknown model or version (None: the newest); 403 for a model or a STAT request the tenant may
        not send."""
        if model is not None:
            record.model_version = self.repository.get(model, version).version
            record.model = model
            if tenant and not tenant.may_use(model):
                raise Forbidden(f"tenant {record.tenant_id} may not use model {model}")
        if record.stat and tenant and not tenant.stat:
            raise Forbidden(f"tenant {record.tenant_id} may not send STAT requests")

    def _upload_limit(self, tenant: TenantConfig | None) -> int:
        """The tenant's upload limit, never above the server's."""
        tenant_limit = tenant.max_upload_bytes if tenant else None
        return min(self.server_upload_limit, tenant_limit or self.server_upload_limit)

    async def _admit(self, record: _VisitRecord) -> None:
        """Count the request in at the gate, against its tenant's rate and concurrency; 429 if over."""
        if self._renewing is None:
            self._renewing = _detached(self._renew_held)
        record.admitted = True  # set before the call: if it is cancelled, the gate may still have counted it in
        self.held[record.request_id] = record
        refusal = await self.gate_link.admit(record.tenant_id, record.request_id)
        if refusal is not None:
            record.admitted = False
            self.held.pop(record.request_id, None)
            raise TooManyRequests(
                f"tenant {record.tenant_id} is over its {refusal.reason} quota", refusal.retry_after_s
            )

    def _audit_line(self, record: _VisitRecord, status: int, error: str | None, total_s: float) -> dict:
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
            "request_id": record.request_id if _RESULT_ID.match(record.request_id) else None,
            "tenant": record.tenant_id,
            "route": record.route,
            "model": record.model,
            "model_version": record.model_version,
            "stat": record.stat,
            "study_hash": self.audit.study_hash(record.study_instance_uid),
            "outcome": outcome,
            "status": status,
            "error": error,
            "timings_ms": {**record.timings_ms, "total": round(total_s * 1000, 1)},
            "replica": self.audit.writer,
            **({"verdict": record.verdict} if record.verdict else {}),
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
