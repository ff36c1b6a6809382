"""A slide's results as DICOM objects (highdicom) that a pathology PACS and its viewers take, on the slide's own image:
its tiles and tumour regions as Microscopy Bulk Simple Annotations (ANN), its heatmap as a Parametric Map.

**Annotations.** Each classified tile is a polygon, its four corners in the pixel coordinates of the slide's base level
(its total pixel matrix: (0, 0) the top-left corner of the top-left pixel), in two groups: tiles whose probability is
at least the threshold (Neoplasm) and the others (Tissue), each tile with its probability as a measurement
("Probability of cancer", no units). The tumour regions (``regions.py``) follow in a third group, each region's outline
a polygon with its mean probability and its area (µm²) as measurements; an ANN polygon has no holes, so the regions'
holes are a fourth group, with their area. Tiles and regions are kept in one object, as groups a viewer shows or hides
apart: the tiles carry each probability, the regions what a pathologist reads first, and one object is one store.
Made only for a slide read from DICOM WSI: the annotations reference its image and carry its patient, study and
specimen, as highdicom copies them from it.

**Parametric Map.** The heatmap itself, one float32 pixel per model tile (NaN where no tissue, exactly the Zarr
heatmap's values), tiled as a whole-slide image of its own on the slide's frame of reference: its pixel spacing is the
tile's extent, its origin the slide's, so a viewer lays it over the slide. A slide in another format (SVS, TIFF...)
has no DICOM image: its map is on a new frame of reference, in a new study, its source a description of the slide
(:func:`described_slide`) that no PACS holds.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from serve_app.model_spec import ModelSpec
from serve_app.results.dicom_seg import COPIED_TYPE_2, algorithm_identification, new_series
from serve_app.wsi.regions import TumourRegion

__all__ = [
    "ANNOTATION_SERIES_NUMBER",
    "PROBABILITY_MAP_SERIES_NUMBER",
    "described_slide",
    "probability_map",
    "slide_annotations",
]

ANNOTATION_SERIES_NUMBER = 9131  # medserve's WSI results, apart from the scanner's series
PROBABILITY_MAP_SERIES_NUMBER = 9132
_REGION_COLOUR, _HOLE_COLOUR = (30.0, 60.0, 40.0), (90.0, 0.0, 0.0)  # CIELab: dark red, white
_GROUPS = (  # (label, category, type, CIELab display colour, the probability's side), for p >= threshold and below
    ("Tumour tiles", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm, (44.0, 68.0, 56.0), ">="),
    ("Other tissue tiles", codes.SCT.Tissue, codes.SCT.Tissue, (42.0, 14.0, -45.0), "<"),
)


def slide_annotations(
    heatmap: np.ndarray,
    regions: list[TumourRegion],
    *,
    tile_extent_level0: float,
    source: pydicom.Dataset,
    spec: ModelSpec,
    threshold: float = 0.5,
) -> hd.ann.MicroscopyBulkSimpleAnnotations:
    """The classified tiles of ``heatmap`` ((rows, cols) float32, NaN where no tissue) as annotations of ``source``,
    the slide's base-level image, in two groups (P >= ``threshold`` and below); tile ``(r, c)`` is the square
    ``[c*e, (c+1)*e] x [r*e, (r+1)*e]`` of its pixels, ``e = tile_extent_level0``, as in ``tiles.geojson``. Then
    ``regions`` (in the same level-0 pixel coordinates) as two more groups: "Tumour regions" (their outlines, with
    each region's mean probability and area) and "Holes in tumour regions" (with each hole's area), where there are
    any."""
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
    groups += _region_groups(regions, spec, threshold, first_number=len(groups) + 1)
    if not groups:
        raise ValueError("no classified tiles: nothing to annotate")
    annotations = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[reference_image(source)[0]],  # as it was, if from reference_image
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=groups,
        device_serial_number="1",
        content_description=f"tile classification by {spec.name} {spec.version}"[:64],
        content_label="TILES",
        **new_series(ANNOTATION_SERIES_NUMBER, f"{spec.name} tile classification"),
    )
    _set_laterality(annotations, source)
    return annotations


def _region_groups(
    regions: list[TumourRegion], spec: ModelSpec, threshold: float, *, first_number: int
) -> list[hd.ann.AnnotationGroup]:
    """The regions' outlines and their holes as annotation groups numbered from ``first_number``; none if no region."""
    if not regions:
        return []
    area = codes.SCT.Area
    outlines = hd.ann.AnnotationGroup(
        number=first_number,
        uid=hd.UID(),
        label="Tumour regions",
        annotated_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        annotated_property_type=codes.SCT.Neoplasm,
        graphic_type=hd.ann.GraphicTypeValues.POLYGON,
        graphic_data=[_open_ring(region.outline) for region in regions],
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(spec),
        measurements=[
            hd.ann.Measurements(
                name=codes.DCM.ProbabilityOfCancer,
                values=np.array([region.mean_probability for region in regions], np.float32),
                unit=codes.UCUM.NoUnits,
            ),
            hd.ann.Measurements(
                name=area,
                values=np.array([region.area_um2 for region in regions], np.float32),
                unit=codes.UCUM.SquareMicrometer,
            ),
        ],
        description=f"{spec.name} regions, P({spec.labels[1].name}) >= {threshold:g}; mean P"[:64],
        display_color=hd.color.CIELabColor(*_REGION_COLOUR),
    )
    holes = [hole for region in regions for hole in region.holes]
    if not holes:
        return [outlines]
    hole_group = hd.ann.AnnotationGroup(
        number=first_number + 1,
        uid=hd.UID(),
        label="Holes in tumour regions",
        annotated_property_category=codes.SCT.Tissue,
        annotated_property_type=codes.SCT.Tissue,
        graphic_type=hd.ann.GraphicTypeValues.POLYGON,
        graphic_data=[_open_ring(hole) for hole in holes],
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(spec),
        measurements=[
            hd.ann.Measurements(
                name=area,
                values=np.array([a for region in regions for a in region.hole_areas_um2], np.float32),
                unit=codes.UCUM.SquareMicrometer,
            )
        ],
        description="not tumour (or no tissue) inside a tumour region",
        display_color=hd.color.CIELabColor(*_HOLE_COLOUR),
    )
    return [outlines, hole_group]


def _open_ring(ring: np.ndarray) -> np.ndarray:
    """A closed ring (first point repeated last) as an ANN polygon, which closes itself: (n, 2) float32."""
    return np.asarray(ring[:-1], dtype=np.float32)


def tile_polygons(cells: np.ndarray, tile_extent_level0: float) -> list[np.ndarray]:
    """Each (row, col) of ``cells`` as its tile's square: (4, 2) float32 (x, y) corners, clockwise from top-left."""
    corners = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)  # (dx, dy) in tiles
    origin = cells[:, ::-1].astype(np.float64)  # (x, y) = (col, row)
    squares = (origin[:, None, :] + corners[None]) * tile_extent_level0
    return list(squares.astype(np.float32))


def reference_image(source: pydicom.Dataset) -> tuple[pydicom.Dataset, bool]:
    """What the DICOM results of a slide reference of its base-level image ``source`` (its header): a shallow copy
    completed where a dicomizer left a required attribute out, and whether its frame of reference is the slide's own
    (False: the slide had none, and a new one was made, shared by the results made from this copy)."""
    reference = pydicom.Dataset()  # a copy of its elements: pydicom.Dataset(source) would share source's own
    for element in source:
        reference.add(element)
    own_frame = "FrameOfReferenceUID" in reference
    if not own_frame:
        # Type 1 in the WSI IOD, yet some dicomizers (OrthancWSIDicomizer) leave it out. highdicom compares the
        # sources' before anything else; annotations in the image's pixel coordinates (2D) do not carry it.
        reference.FrameOfReferenceUID = hd.UID()
    for keyword in COPIED_TYPE_2:  # present, if empty, in a conformant image; written empty where it had none
        if keyword not in reference:
            setattr(reference, keyword, None)
    return reference, own_frame


def probability_map(
    heatmap: np.ndarray, *, tile_extent_level0: float, source: pydicom.Dataset, spec: ModelSpec
) -> hd.pm.ParametricMap:
    """``heatmap`` ((rows, cols) float32, NaN where no tissue) as a Parametric Map over ``source``, the slide's
    base-level image (from :func:`reference_image`, or :func:`described_slide`): pixel ``(r, c)`` is tile ``(r, c)``,
    the square of ``tile_extent_level0`` source pixels from ``(c*e, r*e)``, on the source's frame of reference."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap is (rows, cols), not {heatmap.shape}")
    reference = reference_image(source)[0]  # as it was, if from reference_image
    measures = reference.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    row_spacing, column_spacing = (float(v) for v in measures.PixelSpacing)  # mm between rows, between columns
    extent = float(tile_extent_level0)
    orientation = [float(v) for v in reference.ImageOrientationSlide]
    origin = reference.TotalPixelMatrixOriginSequence[0]
    # The centre of the map's first pixel: half a tile less half a source pixel along the rows and down the columns
    # from the centre of the source's first pixel, which is the total pixel matrix's origin.
    half = (extent - 1.0) / 2.0
    position = (
        np.array([float(origin.XOffsetInSlideCoordinateSystem), float(origin.YOffsetInSlideCoordinateSystem), 0.0])
        + np.array(orientation[:3]) * half * column_spacing
        + np.array(orientation[3:]) * half * row_spacing
    )
    label = spec.labels[1].name
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="P",
        lut_explanation=f"P({label}) per {spec.name} tile"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=codes.DCM.ProbabilityOfCancer,
    )
    parametric_map = hd.pm.ParametricMap(
        source_images=[reference],
        pixel_array=heatmap,
        device_serial_number="1",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="PROBABILITY",
        content_description=f"P({label}) per tile by {spec.name} {spec.version}"[:64],
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=(row_spacing * extent, column_spacing * extent),
            slice_thickness=float(getattr(measures, "SliceThickness", None) or 0.001),
        ),
        plane_orientation=hd.PlaneOrientationSequence(coordinate_system="SLIDE", image_orientation=orientation),
        plane_positions=[
            hd.PlanePositionSequence(
                coordinate_system="SLIDE", image_position=tuple(position), pixel_matrix_position=(1, 1)
            )
        ],
        tile_pixel_array=True,
        tile_size=(min(heatmap.shape[0], 256), min(heatmap.shape[1], 256)),
        **new_series(PROBABILITY_MAP_SERIES_NUMBER, f"{spec.name} tumour probability map"),
    )
    _set_laterality(parametric_map, source)
    return parametric_map


def _set_laterality(result: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """General Series' Laterality (2C: a paired body part's) as the slide's, and empty where the slide does not say
    and no specimen description tells what was imaged: dciodvfy asks for it then, and refuses it beside one. The
    specimen's body part is rarely known to the scanner."""
    if "Laterality" in source or "SpecimenDescriptionSequence" not in result:
        result.Laterality = source.get("Laterality") or None


def described_slide(*, width: int, height: int, mpp: float) -> pydicom.Dataset:
    """The header of a VL Whole Slide Microscopy image that a slide in another format (SVS, TIFF...) would be, for a
    Parametric Map to stand on: its level 0 of ``width`` x ``height`` pixels at ``mpp`` µm, new study, series,
    instance and frame of reference UIDs, the patient unknown (empty), the image on the slide as scanners lay it
    (rows along the slide's -y axis). No PACS holds this image: the map references it only by its UIDs."""
    image = pydicom.Dataset()
    image.SOPClassUID = hd.UID("1.2.840.10008.5.1.4.1.1.77.1.6")  # VL Whole Slide Microscopy Image Storage
    image.SOPInstanceUID = hd.UID()
    image.StudyInstanceUID = hd.UID()
    image.SeriesInstanceUID = hd.UID()
    image.FrameOfReferenceUID = hd.UID()
    image.Modality = "SM"
    image.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    for keyword in COPIED_TYPE_2:
        setattr(image, keyword, None)
    image.StudyID = image.AccessionNumber = image.ReferringPhysicianName = None
    image.ContainerIdentifier = "UNKNOWN"
    image.IssuerOfTheContainerIdentifierSequence = image.ContainerTypeCodeSequence = []
    image.SpecimenDescriptionSequence = [hd.SpecimenDescription(specimen_id="UNKNOWN", specimen_uid=hd.UID())]
    image.Rows = image.Columns = 256
    image.TotalPixelMatrixRows, image.TotalPixelMatrixColumns = int(height), int(width)
    image.NumberOfFrames = 1
    image.SamplesPerPixel, image.PhotometricInterpretation = 3, "RGB"
    image.BitsAllocated = image.BitsStored = 8
    image.HighBit, image.PixelRepresentation = 7, 0
    image.ImageOrientationSlide = [0.0, -1.0, 0.0, -1.0, 0.0, 0.0]
    origin = pydicom.Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 0.0, 0.0
    image.TotalPixelMatrixOriginSequence = [origin]
    measures = pydicom.Dataset()
    measures.PixelSpacing = [mpp / 1000.0, mpp / 1000.0]
    measures.SliceThickness = 0.001
    shared = pydicom.Dataset()
    shared.PixelMeasuresSequence = [measures]
    image.SharedFunctionalGroupsSequence = [shared]
    image.DimensionOrganizationType = "TILED_FULL"
    return image
