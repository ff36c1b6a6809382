"""A slide's tile classification as DICOM Microscopy Bulk Simple Annotations (ANN, highdicom): what a pathology
PACS and its viewers take, on the slide's own image.

Each classified tile is a polygon, its four corners in the pixel coordinates of the slide's base level (its total
pixel matrix: (0, 0) the top-left corner of the top-left pixel), in two groups: tiles whose probability is at least
the threshold (Neoplasm) and the others (Tissue), each tile with its probability as a measurement ("Probability of
cancer", no units). Made only for a slide read from DICOM WSI: the annotations reference its image and carry its
patient, study and specimen, as highdicom copies them from it.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from serve_app.model_spec import ModelSpec
from serve_app.results.dicom_seg import COPIED_TYPE_2, algorithm_identification, new_series

__all__ = ["ANNOTATION_SERIES_NUMBER", "tile_annotations"]

ANNOTATION_SERIES_NUMBER = 9131  # medserve's WSI results, apart from the scanner's series
_GROUPS = (  # (label, category, type, CIELab display colour, the probability's side), for p >= threshold and below
    ("Tumour tiles", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm, (44.0, 68.0, 56.0), ">="),
    ("Other tissue tiles", codes.SCT.Tissue, codes.SCT.Tissue, (42.0, 14.0, -45.0), "<"),
)


def tile_annotations(
    heatmap: np.ndarray,
    *,
    tile_extent_level0: float,
    source: pydicom.Dataset,
    spec: ModelSpec,
    threshold: float = 0.5,
) -> hd.ann.MicroscopyBulkSimpleAnnotations:
    """The classified tiles of ``heatmap`` ((rows, cols) float32, NaN where no tissue) as annotations of ``source``,
    the slide's base-level image; tile ``(r, c)`` is the square ``[c*e, (c+1)*e] x [r*e, (r+1)*e]`` of its pixels,
    ``e = tile_extent_level0``, as in ``tiles.geojson``."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    classified = np.isfinite(heatmap)
    groups = []
    for (label, category, kind, colour, side), members in zip(
        _GROUPS, (classified & (heatmap >= threshold), classified & ~(heatmap >= threshold)), strict=True
    ):
        cells = np.argwhere(members)  # (n, 2) row, col: row-major, as the GeoJSON's features
        if not len(cells):
            continue
        probabilities = heatmap[members].astype(np.float32)
        groups.append(
            hd.ann.AnnotationGroup(
                number=len(groups) + 1,
                uid=hd.UID(),
                label=label,
                annotated_property_category=category,
                annotated_property_type=kind,
                graphic_type=hd.ann.GraphicTypeValues.POLYGON,
                graphic_data=tile_polygons(cells, tile_extent_level0),
                algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
                algorithm_identification=algorithm_identification(spec),
                measurements=[
                    hd.ann.Measurements(
                        name=codes.DCM.ProbabilityOfCancer, values=probabilities, unit=codes.UCUM.NoUnits
                    )
                ],
                description=f"{spec.name} tiles, P({spec.labels[1].name}) {side} {threshold:g}"[:64],
                display_color=hd.color.CIELabColor(*colour),
            )
        )
    if not groups:
        raise ValueError("no classified tiles: nothing to annotate")
    reference = pydicom.Dataset(source)  # a shallow copy: what highdicom reads of the image, completed below
    if "FrameOfReferenceUID" not in reference:
        # Type 1 in the WSI IOD, yet some dicomizers (OrthancWSIDicomizer) leave it out. highdicom compares the
        # sources' before anything else; annotations in the image's pixel coordinates (2D) do not carry it.
        reference.FrameOfReferenceUID = hd.UID()
    for keyword in COPIED_TYPE_2:  # present, if empty, in a conformant image; written empty where it had none
        if keyword not in reference:
            setattr(reference, keyword, None)
    annotations = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[reference],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=groups,
        device_serial_number="1",
        content_description=f"tile classification by {spec.name} {spec.version}"[:64],
        content_label="TILES",
        **new_series(ANNOTATION_SERIES_NUMBER, f"{spec.name} tile classification"),
    )
    # General Series' Laterality (2C: required for a paired body part) as the slide's, empty where it does not say:
    # the specimen's body part is rarely known to the scanner.
    annotations.Laterality = source.get("Laterality") or None
    return annotations


def tile_polygons(cells: np.ndarray, tile_extent_level0: float) -> list[np.ndarray]:
    """Each (row, col) of ``cells`` as its tile's square: (4, 2) float32 (x, y) corners, clockwise from top-left."""
    corners = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)  # (dx, dy) in tiles
    origin = cells[:, ::-1].astype(np.float64)  # (x, y) = (col, row)
    squares = (origin[:, None, :] + corners[None]) * tile_extent_level0
    return list(squares.astype(np.float32))
