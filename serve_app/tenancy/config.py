"""The config sections of tenancy: ``tenants``, ``scheduling`` and ``audit``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ALL_MODELS = "*"
TenantId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
KeyHash = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]


class _Strict(BaseModel):
    # The same rules as serve_app.config: a misspelt key is a bad field.
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimitConfig(_Strict):
    """A token bucket: ``per_second`` tokens flow in, at most ``burst`` are kept; a segment request takes one."""

    per_second: float = Field(gt=0)
    burst: int = Field(ge=1)


class TenantConfig(_Strict):
    name: str = Field(min_length=1)  # display name
    api_key_hashes: list[KeyHash] = Field(min_length=1)  # made by `medserve tenant-key ID`
    models: list[str] = Field(min_length=1)  # model names, or "*" for every model
    rate: RateLimitConfig
    max_concurrent: int = Field(ge=1)
    max_upload_bytes: Optional[int] = Field(None, gt=0)  # None: the server's limits.max_upload_bytes
    stat: bool = False  # may send STAT (emergency) requests

    def may_use(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models


class SchedulingConfig(_Strict):
    # Studies in preprocess -> model -> postprocess at once, cluster-wide; the rest wait in the fair queue.
    processing_slots: int = Field(2, ge=1)
    # An ingress replica renews its requests' counts every quarter of this; counts it stops renewing
    # (it died mid-request) are given back after this long. Longer than any pause of a live replica.
    lease_s: float = Field(60.0, ge=1.0)


class AuditConfig(_Strict):
    directory: Optional[Path] = None  # None: <storage.root>/audit
    max_bytes: int = Field(50 * 1024**2, ge=1024)  # per file, before it rotates
    backup_count: int = Field(20, ge=1)
