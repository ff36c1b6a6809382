"""The ``pacs`` config section: the DICOMweb servers medserve may retrieve studies from and store results to.

medserve only ever talks to the servers named here: a request names a PACS by its key in this section,
never by an address (no server-side request forgery).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, StringConstraints, model_validator

from serve_app.config.tenancy import TenantId
from serve_app.strict_model import StrictModel

__all__ = ["ALL_TENANTS", "PacsConfig", "PacsName"]

ALL_TENANTS = "*"

PacsName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class PacsConfig(StrictModel):
    """One DICOMweb server (a PACS or a vendor-neutral archive): where it is, how to sign in, who may use it."""

    url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s/?#]+[^\s?#]*$")] = Field(
        description="The server's DICOMweb root, e.g. http://orthanc:8042/dicom-web (QIDO, WADO and STOW "
        "paths are appended to it)."
    )
    username: str | None = Field(None, description="HTTP basic authentication: the user; null: none.")
    password: SecretStr | None = Field(None, description="HTTP basic authentication: the password.")
    bearer_token: SecretStr | None = Field(
        None, description="Sent as `Authorization: Bearer <token>` (instead of basic authentication)."
    )
    tenants: list[TenantId | Literal["*"]] | None = Field(
        None,
        description='Tenants that may use this server, or ["*"] to share it with every tenant; another tenant '
        "naming it gets a 403. Required when tenants are configured (a PACS holds patients of its own hospital); "
        "null is allowed only on an open server (no tenants).",
    )
    store_results: bool = Field(
        False, description="Store each result's DICOM SEG and SR back to this server unless a request says otherwise."
    )
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Seconds to wait for the server's first byte.")
    store_attempts: int = Field(
        3, ge=1, le=20, description="Tries of a store-back the server refuses or drops, with a growing pause between."
    )
    retry_after_s: int = Field(
        30, ge=1, description="What a 502/503 tells a client to wait (Retry-After) when this server fails."
    )

    def allows(self, tenant_id: str) -> bool:
        """Whether ``tenant_id`` may retrieve from and store to this server."""
        return self.tenants is None or ALL_TENANTS in self.tenants or tenant_id in self.tenants

    @model_validator(mode="after")
    def _one_kind_of_auth(self) -> PacsConfig:
        if self.bearer_token is not None and self.username is not None:
            raise ValueError("give either username/password or bearer_token, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self
