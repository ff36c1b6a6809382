"""A result as FHIR R4: a ``DiagnosticReport`` with one ``Observation`` per label volume, for an EHR's integration
engine.

Built and validated with ``fhir.resources`` (its R4B models: FHIR 4.3, wire-compatible with R4 for these
resources), returned as a ``Bundle`` of type collection whose report references its observations by ``urn:uuid``.
The imaging study is referenced by its StudyInstanceUID as an identifier (``urn:dicom:uid``, as FHIR's
ImagingStudy carries it), since medserve does not know the EHR's resource ids; for the same reason the report has
no subject. The report is ``preliminary``: no person has verified an automatic result.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference

from serve_app.model_repository import CodeSpec, ModelSpec
from serve_app.results.measurements import LabelVolume

__all__ = ["fhir_report"]

# DICOM coding scheme designators -> FHIR code systems (those medserve's model.yaml files use).
_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
}
_RADIOLOGY = CodeableConcept(
    coding=[Coding(system="http://terminology.hl7.org/CodeSystem/v2-0074", code="RAD", display="Radiology")]
)
_IMAGING = CodeableConcept(
    coding=[
        Coding(system="http://terminology.hl7.org/CodeSystem/observation-category", code="imaging", display="Imaging")
    ]
)
_REPORT_CODE = CodeableConcept(
    coding=[Coding(system="http://loinc.org", code="18748-4", display="Diagnostic imaging study")]
)
_VOLUME = CodeableConcept(coding=[Coding(system=_SYSTEMS["SCT"], code="118565006", display="Volume")])


def fhir_report(
    result_id: str,
    spec: ModelSpec,
    volumes: Sequence[LabelVolume],
    issued: datetime,
    study_instance_uid: str | None = None,
) -> Bundle:
    """The result ``result_id`` of model ``spec`` as a Bundle: its DiagnosticReport first, then one Observation
    per entry of ``volumes`` (each label's volume in mL, its body site the label's code where the model.yaml
    gives one).

    Args:
        result_id: the result's id (32 hex digits): the report's identifier, as a urn:uuid.
        spec: the model that made the result.
        volumes: each foreground label's volume, as the result reports it.
        issued: when the result was made (timezone-aware).
        study_instance_uid: the source study, referenced by the report and each observation; None for a NIfTI
            study.
    """
    study = _study_reference(study_instance_uid) if study_instance_uid else None
    device = Reference(display=f"medserve {spec.name} {spec.version}")
    observations = [_observation(volume, spec, issued, study, device) for volume in volumes]
    urls = [f"urn:uuid:{uuid.uuid4()}" for _ in observations]
    conclusion = "; ".join(f"{volume.name} {volume.volume_ml:.1f} mL" for volume in volumes)
    report = DiagnosticReport(
        identifier=[Identifier(system="urn:ietf:rfc:3986", value=f"urn:uuid:{uuid.UUID(hex=result_id)}")],
        status="preliminary",
        category=[_RADIOLOGY],
        code=_REPORT_CODE,
        issued=issued,
        effectiveDateTime=issued,
        performer=[device],
        imagingStudy=[study] if study else None,
        result=[Reference(reference=url) for url in urls],
        conclusion=f"{spec.name} {spec.version}: {conclusion or 'no label found'}",
    )
    entries = [BundleEntry(fullUrl=f"urn:uuid:{uuid.uuid4()}", resource=report)]
    entries += [BundleEntry(fullUrl=url, resource=obs) for url, obs in zip(urls, observations, strict=True)]
    return Bundle(type="collection", timestamp=issued, entry=entries)


def _observation(
    volume: LabelVolume, spec: ModelSpec, issued: datetime, study: Reference | None, device: Reference
) -> Observation:
    label = spec.labels[volume.label]
    return Observation(
        status="preliminary",
        category=[_IMAGING],
        code=_VOLUME,
        bodySite=_concept(label.code, label.name) if label.code else CodeableConcept(text=label.name),
        valueQuantity=Quantity(value=round(volume.volume_ml, 3), unit="mL", system=_SYSTEMS["UCUM"], code="mL"),
        effectiveDateTime=issued,
        issued=issued,
        device=device,
        derivedFrom=[study] if study else None,
    )


def _concept(code: CodeSpec, text: str) -> CodeableConcept:
    system = _SYSTEMS.get(code.scheme, f"urn:medserve:coding-scheme:{code.scheme}")
    return CodeableConcept(coding=[Coding(system=system, code=code.value, display=code.meaning)], text=text)


def _study_reference(study_instance_uid: str) -> Reference:
    return Reference(
        type="ImagingStudy",
        identifier=Identifier(system="urn:dicom:uid", value=f"urn:oid:{study_instance_uid}"),
    )
