"""The config sections of medserve's DICOM network node: ``dicom_network``, ``routes`` and ``destinations``.

Nothing listens unless ``dicom_network`` is set. Routes and destinations are checked against the rest of the
application's config (tenants, ``pacs``) once, at start (``check_against``): a route names tenants, AE titles and
destinations that exist, and a destination only ever receives results of tenants it is open to.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, Field, IPvAnyNetwork, StringConstraints, model_validator
from pydicom.datadict import tag_for_keyword

from serve_app.config.pacs import ALL_TENANTS, PacsName
from serve_app.config.tenancy import TenantId
from serve_app.strict_model import StrictModel

if TYPE_CHECKING:
    from serve_app.config import AppConfig

__all__ = [
    "AeTitle",
    "CalledAeConfig",
    "DestinationConfig",
    "DestinationName",
    "DicomNetworkConfig",
    "DicomNetworkLimits",
    "DimseDestinationConfig",
    "NumberRange",
    "RouteConfig",
    "RouteName",
    "SeriesMatch",
    "check_against",
]

# What DICOM allows in an AE title (16 characters of the default repertoire), less spaces and backslashes: a title
# with either is legal but a frequent cause of "not recognised" between two sites' configs.
AeTitle = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{1,16}$")]
RouteName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
DestinationName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


def _regular_expression(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"{value!r} is not a regular expression: {e}") from None
    return value


def _dicom_keyword(value: str) -> str:
    if tag_for_keyword(value) is None:
        raise ValueError(f"{value!r} is not a DICOM attribute keyword (as in PS3.6, e.g. ConvolutionKernel)")
    return value


Regex = Annotated[str, AfterValidator(_regular_expression)]
DicomKeyword = Annotated[str, AfterValidator(_dicom_keyword)]


class CalledAeConfig(StrictModel):
    """One AE title medserve answers to: the tenant it belongs to and who may send to it."""

    tenant: TenantId | None = Field(
        None,
        description="The tenant whose studies arrive at this AE title: its quotas, audit and metrics apply, and its "
        "results go only to destinations open to it. Required when tenants are configured; null on an open server "
        "(tenant anonymous).",
    )
    callers: dict[AeTitle, list[IPvAnyNetwork]] = Field(
        min_length=1,
        description="Calling AE titles allowed to send to this AE title, each with the addresses (or networks, "
        "10.0.0.0/24) it may connect from; an empty list: from any address. Any other caller's association is "
        "rejected (calling AE title not recognised) and audited.",
    )

    def allows(self, calling_ae_title: str, address: str) -> bool:
        """Whether ``calling_ae_title`` connecting from ``address`` may send to this AE title."""
        networks = self.callers.get(calling_ae_title)
        if networks is None:
            return False
        if not networks:
            return True
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(peer in network for network in networks)


class DicomNetworkLimits(StrictModel):
    """What senders may load the node with; past a limit a C-STORE is answered with Out of Resources (A700)."""

    max_associations: int = Field(
        16, ge=1, le=1000, description="Associations open at once, all callers together; more are rejected (transient)."
    )
    max_inbox_instances_per_tenant: int = Field(
        50_000,
        ge=1,
        description="Instances of one tenant received and not yet processed; past it that tenant's C-STOREs are "
        "answered Out of Resources (A700) until its series are processed. Other tenants are not slowed.",
    )
    max_instance_bytes: int = Field(
        2 * 1024**3,
        ge=1024,
        description="Bytes of one received instance (as the sender encoded it, file meta included); a larger one is "
        "answered Out of Resources (A700). It arrives in a private temporary file, never whole in memory, and "
        "bounds what the inbox reads back to store it.",
    )
    max_inbox_bytes_per_tenant: int = Field(
        50 * 1024**3,
        ge=1,
        description="Bytes of one tenant received and not yet processed; past it as max_inbox_instances_per_tenant.",
    )


class DicomNetworkConfig(StrictModel):
    """medserve as a DICOM node: a C-STORE/C-ECHO listener whose series are routed to models by their tags."""

    host: str = Field(
        "127.0.0.1",
        description="Address the listener binds to: loopback unless a PACS on another machine must reach it.",
    )
    port: int = Field(11112, ge=0, le=65535, description="TCP port of the listener (0: any free port, for tests).")
    ae_titles: dict[AeTitle, CalledAeConfig] = Field(
        min_length=1,
        description="AE titles medserve answers to (the called AE title a sender uses), each owned by one tenant; "
        "an association to another is rejected (called AE title not recognised).",
    )
    stable_after_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="A series is complete once no instance of it has arrived for this long (Orthanc's stable "
        "series); it is then routed. After a restart the clock starts again, so a sender re-sending has this long.",
    )
    folder: Path | None = Field(
        None,
        description="Where the inbox (received series) and outbox (results waiting for delivery) are kept, 0700; "
        "null: <storage.root>/state/dicom-network/<application name>, so that two applications on one storage root "
        "never share a node's state.",
    )
    processing_workers: int = Field(
        2, ge=1, le=64, description="Routed series processed at once (each calls the route's model)."
    )
    keep_processed_series_hours: float = Field(
        24.0, gt=0, description="Hours a processed series stays in the inbox (a re-send within it is recognised)."
    )
    network_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Seconds an association may stay silent before it is aborted."
    )
    delivery_attempts: int = Field(
        40, ge=1, le=1000, description="Tries of a delivery whose destination is down, before it is marked failed."
    )
    delivery_first_retry_s: float = Field(
        5.0, gt=0, description="Seconds before a failed delivery's second try; each later pause doubles."
    )
    delivery_max_retry_s: float = Field(600.0, gt=0, description="The longest pause between tries of a delivery.")
    limits: DicomNetworkLimits = Field(DicomNetworkLimits(), description="Associations and per-tenant inbox limits.")

    def folder_under(self, storage_root: Path, application: str) -> Path:
        """The node's folder, its default resolved (``application``: the application's name)."""
        return self.folder or Path(storage_root) / "state" / "dicom-network" / application


class NumberRange(StrictModel):
    """A closed range; either end may be left open."""

    min: float | None = Field(None, description="Smallest value matched; null: no lower bound.")
    max: float | None = Field(None, description="Largest value matched; null: no upper bound.")

    def contains(self, value: float | None) -> bool:
        if value is None:
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    @model_validator(mode="after")
    def _ordered(self) -> NumberRange:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is more than max ({self.max})")
        return self


class SeriesMatch(StrictModel):
    """What a complete series must be for a route to take it: every condition set must hold (unset: any)."""

    modality: list[str] | None = Field(None, description="Modality (0008,0060), any of, e.g. [CT].")
    body_part_examined: list[str] | None = Field(
        None, description="BodyPartExamined (0018,0015), any of, case-insensitive, e.g. [ABDOMEN, CHEST]."
    )
    series_description: Regex | None = Field(
        None, description="A regular expression SeriesDescription (0008,103E) must contain, e.g. '(?i)portal|venous'."
    )
    protocol_name: Regex | None = Field(None, description="A regular expression ProtocolName (0018,1030) must contain.")
    image_type_includes: list[str] = Field(
        [], description="Values ImageType (0008,0008) must all hold, e.g. [ORIGINAL, PRIMARY, AXIAL]."
    )
    image_type_excludes: list[str] = Field(
        ["LOCALIZER"], description="Values ImageType must not hold: by default a scout (LOCALIZER) is never routed."
    )
    slice_count: NumberRange | None = Field(None, description="Instances in the series, e.g. {min: 20}.")
    slice_thickness_mm: NumberRange | None = Field(None, description="SliceThickness (0018,0050) in mm, e.g. {max: 5}.")
    tenants: list[TenantId] | None = Field(None, description="Tenants whose series it takes; null: any.")
    called_ae_titles: list[AeTitle] | None = Field(
        None, description="AE titles of medserve the series must have been sent to; null: any."
    )
    tags: dict[DicomKeyword, Regex] = Field(
        {},
        description="Any other attribute by its DICOM keyword: a regular expression its value (as text) must "
        "contain, e.g. {ConvolutionKernel: '^(B30f|STANDARD)$'}.",
    )


class RouteConfig(StrictModel):
    """A rule: series that match go to a model, and its results to destinations."""

    match: SeriesMatch = Field(description="What a complete series must be for this route to take it.")
    model: str = Field(min_length=1, description="The model that processes the series (its name in the repository).")
    model_version: str | None = Field(None, description="The model's version; null: its newest.")
    destinations: list[DestinationName] = Field(
        [], description="Where the results (DICOM SEG and SR) are delivered; none: kept in medserve only."
    )


class DimseDestinationConfig(StrictModel):
    """A DICOM node results are sent to by C-STORE (a PACS's AE)."""

    host: str = Field(description="The PACS's address.")
    port: int = Field(ge=1, le=65535, description="Its DICOM port.")
    ae_title: AeTitle = Field(description="Its AE title (the called AE title of medserve's association).")
    calling_ae_title: AeTitle = Field(
        "MEDSERVE", description="medserve's AE title as the PACS knows it (the calling AE title)."
    )
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Seconds to wait for the PACS's answers.")


class DestinationConfig(StrictModel):
    """Where results go: a PACS by C-STORE, or a DICOMweb server of the ``pacs`` section by STOW-RS."""

    dimse: DimseDestinationConfig | None = Field(None, description="C-STORE to this AE; or set dicomweb.")
    dicomweb: PacsName | None = Field(
        None, description="STOW-RS to this server of the pacs section (its tenants apply); or set dimse."
    )
    tenants: list[TenantId | Literal["*"]] | None = Field(
        None,
        description='A dimse destination: tenants whose results it may receive, or ["*"]; required when tenants '
        "are configured. A dicomweb destination takes the pacs server's tenants instead.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> DestinationConfig:
        if (self.dimse is None) == (self.dicomweb is None):
            raise ValueError("set exactly one of dimse (C-STORE) and dicomweb (a pacs server's name)")
        if self.dicomweb is not None and self.tenants is not None:
            raise ValueError(f"tenants is for a dimse destination; set pacs.{self.dicomweb}.tenants instead")
        return self


def check_against(config: AppConfig) -> None:
    """Raise ``ValueError`` naming the field when ``config``'s DICOM network sections refer to what it lacks, or
    would send one tenant's results where that tenant may not send."""
    network = config.dicom_network
    tenants = set(config.tenants)
    if network is not None:
        for title, called in network.ae_titles.items():
            if tenants and called.tenant is None:
                raise ValueError(f"dicom_network.ae_titles.{title}.tenant is not set, but tenants are configured")
            if called.tenant is not None and called.tenant not in tenants:
                raise ValueError(
                    f"dicom_network.ae_titles.{title}.tenant: {called.tenant!r} is not a configured tenant"
                )
    for name, destination in config.destinations.items():
        if destination.dicomweb is not None and destination.dicomweb not in config.pacs:
            raise ValueError(f"destinations.{name}.dicomweb: {destination.dicomweb!r} is not a server of pacs")
        if tenants and destination.dimse is not None and destination.tenants is None:
            raise ValueError(f"destinations.{name}.tenants is not set, but tenants are configured")
    for name, route in config.routes.items():
        field = f"routes.{name}"
        if route.destinations and network is None:
            raise ValueError(f"{field}.destinations: results are delivered by the DICOM node; set dicom_network")
        for destination in route.destinations:
            if destination not in config.destinations:
                raise ValueError(f"{field}.destinations: {destination!r} is not a configured destination")
        unknown = sorted(set(route.match.tenants or ()) - tenants)
        if unknown:
            raise ValueError(f"{field}.match.tenants: {', '.join(unknown)} not configured")
        titles = network.ae_titles if network is not None else {}
        unknown = sorted(set(route.match.called_ae_titles or ()) - set(titles))
        if unknown:
            raise ValueError(f"{field}.match.called_ae_titles: {', '.join(unknown)} not in dicom_network.ae_titles")
        for tenant in _tenants_of(route, config):
            if config.tenants and not config.tenants[tenant].may_use(route.model):
                raise ValueError(f"{field}.model: tenant {tenant!r} may not use model {route.model!r}")
            for destination in route.destinations:
                if not _open_to(config, destination, tenant):
                    raise ValueError(
                        f"{field}.destinations: {destination!r} is not open to tenant {tenant!r}, whose series this "
                        "route may take; narrow match.tenants or add the tenant to the destination"
                    )


def _tenants_of(route: RouteConfig, config: AppConfig) -> list[str]:
    """The tenants whose series ``route`` may take."""
    if route.match.tenants is not None:
        return route.match.tenants
    titles = config.dicom_network.ae_titles if config.dicom_network is not None else {}
    if route.match.called_ae_titles is not None:
        return sorted({titles[title].tenant for title in route.match.called_ae_titles if titles[title].tenant})
    return sorted(config.tenants)


def _open_to(config: AppConfig, destination_name: str, tenant: str) -> bool:
    destination = config.destinations[destination_name]
    if destination.dicomweb is not None:
        return config.pacs[destination.dicomweb].allows(tenant)
    allowed = destination.tenants
    return allowed is None or ALL_TENANTS in allowed or tenant in allowed
