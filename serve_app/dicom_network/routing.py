"""Routing: which models a complete series goes to, by its tags (the ``routes`` config section).

Every route whose conditions all hold takes the series: none is "no route" (recorded, not processed), two run
both. Routes match on the series' first instance's header, its instance count, its tenant and the AE title it was
sent to; they are validated when the config is read (``serve_app.config.dicom_network``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import pydicom

from serve_app.config.dicom_network import RouteConfig, SeriesMatch

__all__ = ["Route", "SeriesFacts", "match_routes"]


@dataclass(frozen=True)
class Route:
    """A route that took a series: its name in the config, the model it names and where results go."""

    name: str
    model: str
    model_version: str | None
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class SeriesFacts:
    """What routes look at: a series' header (its first instance's, pixels not read) and where it came from."""

    header: pydicom.Dataset
    instance_count: int
    tenant: str
    called_ae_title: str


def match_routes(facts: SeriesFacts, routes: Mapping[str, RouteConfig]) -> list[Route]:
    """Every route of ``routes`` that takes the series, in the config's order."""
    return [
        Route(name, route.model, route.model_version, tuple(route.destinations))
        for name, route in routes.items()
        if _matches(route.match, facts)
    ]


def _matches(match: SeriesMatch, facts: SeriesFacts) -> bool:
    header = facts.header
    image_type = {str(value).upper() for value in _values(header, "ImageType")}
    checks = (
        match.modality is None or _text(header, "Modality") in match.modality,
        match.body_part_examined is None
        or _text(header, "BodyPartExamined").upper() in {part.upper() for part in match.body_part_examined},
        match.series_description is None or re.search(match.series_description, _text(header, "SeriesDescription")),
        match.protocol_name is None or re.search(match.protocol_name, _text(header, "ProtocolName")),
        all(value.upper() in image_type for value in match.image_type_includes),
        not any(value.upper() in image_type for value in match.image_type_excludes),
        match.slice_count is None or match.slice_count.contains(facts.instance_count),
        match.slice_thickness_mm is None or match.slice_thickness_mm.contains(_number(header, "SliceThickness")),
        match.tenants is None or facts.tenant in match.tenants,
        match.called_ae_titles is None or facts.called_ae_title in match.called_ae_titles,
        all(re.search(pattern, _text(header, keyword)) for keyword, pattern in match.tags.items()),
    )
    return all(checks)


def _values(header: pydicom.Dataset, keyword: str) -> list:
    value = header.get(keyword)
    if value is None:
        return []
    return list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]


def _text(header: pydicom.Dataset, keyword: str) -> str:
    """The attribute as text (values joined by backslashes, as DICOM writes them); empty when absent."""
    return "\\".join(str(value) for value in _values(header, keyword)).strip()


def _number(header: pydicom.Dataset, keyword: str) -> float | None:
    try:
        return float(header.get(keyword))
    except (TypeError, ValueError):
        return None
