"""What arrives at a model, summarised as a few features with bounded values: input monitoring's raw material.

A study (CT, MR) is summarised by its modality, its scanner's manufacturer (one of ``VENDORS``, ``other`` or
``unknown``), buckets of its slice thickness and in-plane pixel spacing, and three percentiles of the intensities
inside the body. A slide by a bucket of its microns per pixel and the mean haematoxylin and eosin optical densities
of its tissue. Nothing here keeps or returns anything that could identify a patient: the only text taken from a
header, the manufacturer, is mapped onto a fixed list.

Each summary is computed from data already in memory (the volume a request read, the low-resolution level its tissue
mask was made from), on a sub-sample: at most ``MAX_SAMPLED_VOXELS`` voxels or ``MAX_SAMPLED_PIXELS`` pixels.

``serve_app.observability.input_drift`` compares the features of the last inputs with a model's reference.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from serve_app.studies.volume import Volume

__all__ = [
    "BODY_HU",
    "CATEGORY_FEATURES",
    "MAX_SAMPLED_PIXELS",
    "MAX_SAMPLED_VOXELS",
    "RUIFROK_HE_DAB",
    "SLIDE_FEATURES",
    "STUDY_FEATURES",
    "VALUE_FEATURES",
    "VENDORS",
    "InputFeatures",
    "bucket",
    "manufacturer_of",
    "slide_features",
    "stain_optical_densities",
    "study_features",
    "vendor",
]

InputFeatures = dict[str, str | float]
"""One input's features: a category (str) or a value (float) for each name of ``STUDY_FEATURES`` or
``SLIDE_FEATURES``."""

# The features of each kind of input; a category feature's values are few and fixed, a value feature is a number.
STUDY_FEATURES = (
    "modality",
    "manufacturer",
    "slice_thickness_mm",
    "pixel_spacing_mm",
    "intensity_p05",
    "intensity_p50",
    "intensity_p95",
)
SLIDE_FEATURES = ("mpp", "stain_od_hematoxylin", "stain_od_eosin")
CATEGORY_FEATURES = frozenset({"modality", "manufacturer", "slice_thickness_mm", "pixel_spacing_mm", "mpp"})
VALUE_FEATURES = frozenset(set(STUDY_FEATURES) | set(SLIDE_FEATURES)) - CATEGORY_FEATURES

MODALITIES = ("CT", "MR")
# Manufacturer (0008,0070) -> vendor: the lower-cased header must contain one of the words. Toshiba's and Hitachi's
# medical imaging are now Canon's and Fujifilm's.
VENDORS: dict[str, tuple[str, ...]] = {
    "ge": ("ge medical", "ge healthcare", "general electric", "gems"),
    "siemens": ("siemens",),
    "philips": ("philips",),
    "canon": ("canon", "toshiba"),
    "fujifilm": ("fujifilm", "hitachi"),
    "united-imaging": ("united imaging", "uih"),
    "neusoft": ("neusoft",),
}
# Upper bounds (mm, included) of the slice thickness and pixel spacing buckets, and of the slides' mpp buckets.
SLICE_THICKNESS_BOUNDS_MM = (1.0, 2.0, 3.0, 5.0)
PIXEL_SPACING_BOUNDS_MM = (0.5, 0.7, 0.9, 1.2, 2.0)
MPP_BOUNDS = (0.3, 0.6, 1.2)  # about 40x, 20x, 10x objectives, then coarser
# CT: the body is every voxel over -500 HU (air and lung below it). Other modalities: over a tenth of the volume's
# 99th percentile (MR's background is near 0).
BODY_HU = -500.0
BODY_FRACTION_OF_P99 = 0.1
PERCENTILES = (5, 50, 95)
MAX_SAMPLED_VOXELS = 1 << 18
MAX_SAMPLED_PIXELS = 1 << 17
# Ruifrok and Johnston's stain vectors (haematoxylin, eosin, DAB): the optical density each puts in R, G, B, the
# matrix scikit-image's rgb2hed uses.
RUIFROK_HE_DAB = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_STAIN_TO_DENSITY = RUIFROK_HE_DAB / np.linalg.norm(RUIFROK_HE_DAB, axis=1, keepdims=True)
_DENSITY_TO_STAIN = np.linalg.inv(_STAIN_TO_DENSITY)


def bucket(value: float | None, bounds: Sequence[float]) -> str:
    """The bucket of ``value`` among upper bounds ``bounds`` (each included): ``0-1``, ``1-2``, ..., ``5+``;
    ``unknown`` for None or a value that is not a positive number."""
    if value is None or not np.isfinite(value) or value <= 0:
        return "unknown"
    low = 0.0
    for bound in bounds:
        if value <= bound:
            return f"{low:g}-{bound:g}"
        low = bound
    return f"{low:g}+"


def vendor(manufacturer: str | None) -> str:
    """One of ``VENDORS``' names, ``other`` for a manufacturer not in it, ``unknown`` for none."""
    if not manufacturer or not manufacturer.strip():
        return "unknown"
    text = manufacturer.lower()
    for name, words in VENDORS.items():
        if any(word in text for word in words):
            return name
    return "other"


def manufacturer_of(volume: Volume) -> tuple[str | None, float | None]:
    """The Manufacturer and SliceThickness of the first instance of a DICOM volume's source; None, None for NIfTI.

    Only those two elements of one header are parsed, not the series' headers."""
    if volume.source is None or not volume.source.headers:
        return None, None
    import pydicom

    try:
        header = pydicom.dcmread(
            io.BytesIO(volume.source.headers[0]), specific_tags=["Manufacturer", "SliceThickness"], force=True
        )
        manufacturer = str(header.get("Manufacturer") or "") or None
        thickness = header.get("SliceThickness")
        return manufacturer, float(thickness) if thickness not in (None, "") else None
    except (ValueError, TypeError, OSError, pydicom.errors.InvalidDicomError):
        return None, None


def study_features(volume: Volume) -> InputFeatures:
    """The features of a study read into ``volume`` (``STUDY_FEATURES``).

    The slice thickness is the first instance's SliceThickness, else (NIfTI, enhanced multi-frame) the step between
    slices; the pixel spacing is the mean of the two in-plane spacings. Intensity percentiles are of the sampled
    voxels inside the body (``BODY_HU`` for CT; else ``BODY_FRACTION_OF_P99``), of all sampled voxels where none is.
    """
    manufacturer, thickness = manufacturer_of(volume)
    spacing = volume.spacing
    modality = (volume.modality or "").upper()
    percentiles = body_intensity_percentiles(volume.array, modality)
    return {
        "modality": modality if modality in MODALITIES else ("unknown" if not modality else "other"),
        "manufacturer": vendor(manufacturer),
        "slice_thickness_mm": bucket(thickness or spacing[2], SLICE_THICKNESS_BOUNDS_MM),
        "pixel_spacing_mm": bucket((spacing[0] + spacing[1]) / 2, PIXEL_SPACING_BOUNDS_MM),
        **{f"intensity_p{p:02d}": value for p, value in zip(PERCENTILES, percentiles, strict=True)},
    }


def body_intensity_percentiles(array: np.ndarray, modality: str) -> list[float]:
    """``PERCENTILES`` of the body's voxels in a sub-sample of at most ``MAX_SAMPLED_VOXELS`` of ``array``."""
    flat = np.ravel(array, order="K")  # a view for a C- or Fortran-ordered volume
    if flat.size == 0:
        return [0.0] * len(PERCENTILES)
    sample = flat[:: max(1, flat.size // MAX_SAMPLED_VOXELS)].astype(np.float32)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return [0.0] * len(PERCENTILES)
    floor = BODY_HU if modality == "CT" else BODY_FRACTION_OF_P99 * float(np.percentile(sample, 99))
    body = sample[sample > floor]
    return [float(v) for v in np.percentile(body if body.size else sample, PERCENTILES)]


def stain_optical_densities(rgb: np.ndarray, tissue: np.ndarray) -> tuple[float, float] | None:
    """Mean haematoxylin and eosin optical densities of the tissue pixels of ``rgb`` ((H, W, 3) uint8), by Ruifrok
    and Johnston's colour deconvolution of each pixel's optical density (-log10 of its transmitted fraction); at most
    ``MAX_SAMPLED_PIXELS`` pixels sampled. None where ``tissue`` ((H, W) bool) marks none."""
    # Every k-th row and column first (views), so that a large mask's tissue is never copied whole.
    step = max(1, math.isqrt(int(np.count_nonzero(tissue)) // MAX_SAMPLED_PIXELS))
    pixels = rgb[::step, ::step][tissue[::step, ::step]]
    if pixels.shape[0] == 0:
        return None
    pixels = pixels.astype(np.float32)
    density = -np.log10(np.maximum(pixels, 1.0) / 255.0)
    stains = density @ _DENSITY_TO_STAIN.astype(np.float32)
    hematoxylin, eosin = np.clip(stains[:, :2], 0.0, None).mean(axis=0)
    return float(hematoxylin), float(eosin)


def slide_features(mpp: float, stain_od: tuple[float, float] | None) -> InputFeatures:
    """The features of a slide (``SLIDE_FEATURES``): its level 0's microns per pixel, bucketed, and its tissue's mean
    stain optical densities (``stain_optical_densities``; 0 where it has no tissue)."""
    hematoxylin, eosin = stain_od or (0.0, 0.0)
    return {"mpp": bucket(mpp, MPP_BOUNDS), "stain_od_hematoxylin": hematoxylin, "stain_od_eosin": eosin}
