"""The config sections of tenancy: ``tenants``, ``scheduling`` and ``audit``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, StringConstraints

from serve_app.strict_model import StrictModel

__all__ = [
    "ALL_MODELS",
    "RESERVED_TENANT_IDS",
    "AuditConfig",
    "KeyHash",
    "RateLimitConfig",
    "SchedulingConfig",
    "TenantConfig",
    "TenantId",
]

ALL_MODELS = "*"
# A tenant's outputs and uploads live in <wsi.output_root>/<tenant id>/, beside the job records (jobs/); the open
# server's tenant is "anonymous"; wsi.output_root may be storage.root itself, whose folders are the rest. A tenant
# with one of these ids would share that folder.
RESERVED_TENANT_IDS = frozenset(
    {"anonymous", "jobs", "uploads", "results", "audit", "state", "drain", "wsi", "engine-cache"}
)


def _not_reserved(tenant_id: str) -> str:
    if tenant_id in RESERVED_TENANT_IDS:
        raise ValueError(
            f"tenant id {tenant_id!r} is reserved (one of {', '.join(sorted(RESERVED_TENANT_IDS))}): it names a "
            "folder of medserve's own storage; choose another id"
        )
    return tenant_id


TenantId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$"), AfterValidator(_not_reserved)]
KeyHash = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]


class RateLimitConfig(StrictModel):
    """A token bucket: ``per_second`` tokens flow in, at most ``burst`` are kept; a segment request takes one."""

    per_second: float = Field(gt=0, description="Segment requests per second, sustained.")
    burst: int = Field(ge=1, description="Segment requests that may arrive at once after a quiet spell.")


class TenantConfig(StrictModel):
    """One hospital: its keys, the models it may use and its quotas."""

    name: str = Field(min_length=1, description="Display name.")
    api_key_hashes: list[KeyHash] = Field(
        min_length=1, description="sha256: hashes of the tenant's API keys, made by `medserve tenant-key ID`."
    )
    models: list[str] = Field(min_length=1, description='Model names the tenant may use, or "*" for every model.')
    rate: RateLimitConfig = Field(description="The tenant's rate of segment requests.")
    max_concurrent: int = Field(ge=1, description="Segment requests of the tenant in progress at once.")
    max_upload_bytes: int | None = Field(
        None, gt=0, description="Largest upload of the tenant; null: the server's limits.max_upload_bytes."
    )
    request_deadline_s: float | None = Field(
        None, gt=0, description="Seconds the tenant's segment requests may take; null: limits.request_deadline_s."
    )
    stat: bool = Field(False, description="Whether the tenant may send STAT (emergency) requests.")
    wsi_slide_roots: list[Path] = Field(
        [],
        description="Folders the tenant's WSI jobs may read slides from (besides its own uploads); none: uploaded "
        "slides only. Apart from every other tenant's roots and from medserve's storage, so that no tenant reads "
        "another's slides.",
    )
    wsi_upload_quota_bytes: int | None = Field(
        200 * 1024**3,
        gt=0,
        description="Bytes of slides the tenant may keep uploaded at once (POST /v1/wsi/slides); past it an upload "
        "gets 413. Uploads are deleted after wsi.retention_days. null: no quota.",
    )

    def may_use(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models


class SchedulingConfig(StrictModel):
    """Cluster-wide admission of studies to processing, and the leases that keep its counts honest."""

    processing_slots: int = Field(
        2,
        ge=1,
        description="Studies in preprocess -> model -> postprocess at once, cluster-wide; the rest wait in the "
        "fair STAT-first queue.",
    )
    lease_s: float = Field(
        60.0,
        ge=1.0,
        description="An ingress replica renews its requests' counts every quarter of this; counts it stops "
        "renewing (it died mid-request) are given back after this long. Longer than any pause of a live replica.",
    )
    gate_timeout_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Seconds an ingress replica waits for the tenant gate to count a request in before it refuses "
        "the request with 503 and Retry-After (the gate lost or stuck), and stops asking it until it answers again.",
    )


class AuditConfig(StrictModel):
    """The audit log: one rotating file of JSON lines per ingress replica."""

    directory: Path | None = Field(None, description="Where audit files go; null: <storage.root>/audit.")
    max_bytes: int = Field(50 * 1024**2, ge=1024, description="Size of an audit file before it rotates.")
    backup_count: int = Field(20, ge=1, description="Rotated audit files kept per ingress replica.")
