"""The DICOM codes of medserve's DICOM results, and the model.yaml's codes as highdicom takes them."""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from serve_app.model_repository import CodeSpec

__all__ = ["AI_ALGORITHM", "MILLILITRE", "VOLUME", "coded", "procedure_reported"]

VOLUME = codes.SCT.Volume  # SCT 118565006, a measurement of CID 7469
MILLILITRE = CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
AI_ALGORITHM = codes.cid7162.ArtificialIntelligence  # an algorithm's family (CID 7162): a trained network
# TID 1500's Procedure Reported (CID 100) for the modalities a segmentation model takes.
_PROCEDURES = {"CT": codes.cid100.CTUnspecifiedBodyRegion, "MR": codes.cid100.MRIUnspecifiedBodyRegion}


def coded(code: CodeSpec) -> CodedConcept:
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def procedure_reported(modality: str | None) -> Code:
    """The imaging procedure a report's measurements come from: the source series' modality, unspecified region."""
    return _PROCEDURES.get(modality or "", codes.cid100.ImagingProcedure)
