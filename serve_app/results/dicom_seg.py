"""A result's mask as a DICOM Segmentation (highdicom) on its source series' own frames.

The SEG has one segment per foreground label of the model, numbered 1..N in label order, named and coded as the
model's ``model.yaml`` says; BINARY, the type that viewers and PACS display most widely; frames where a segment is
empty are left out. It shares the source's Frame of Reference, and each frame references its source frame.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.valuerep import DA, TM

from serve_app import __version__
from serve_app.model_repository import ModelSpec
from serve_app.results.codes import AI_ALGORITHM, coded
from serve_app.studies.dicom_source import DicomSource

__all__ = [
    "MANUFACTURER",
    "SEG_SERIES_NUMBER",
    "SOFTWARE_VERSION",
    "algorithm_identification",
    "build_segmentation",
    "new_series",
    "segment_numbers",
]

MANUFACTURER = "medserve"
SOFTWARE_VERSION = __version__
# A software device has no unit to tell apart, but Enhanced General Equipment needs a serial number (Type 1).
_DEVICE_SERIAL_NUMBER = "1"
# Fixed and above a scanner's own series numbers, so that a PACS lists the result after the images.
SEG_SERIES_NUMBER = 901
# Patient and study attributes that highdicom copies from the source: Type 2 in every image IOD, so present even
# when empty, but some writers leave them out, or write a date, a time or a sex in a form highdicom refuses
# (ValueError), and it then fails.
COPIED_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# The copied attributes whose values highdicom parses, by the parser it uses; PatientSex is one of these codes.
_PARSED_AS = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}
_PATIENT_SEX_CODES = ("M", "F", "O")


def segment_numbers(spec: ModelSpec) -> dict[int, int]:
    """Each foreground label's segment number: DICOM numbers segments 1, 2, ... without gaps, in label order."""
    return {label: number for number, label in enumerate(spec.foreground_labels, start=1)}


def algorithm_identification(spec: ModelSpec) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name=spec.name, version=spec.version, family=AI_ALGORITHM)


def new_series(series_number: int, description: str) -> dict[str, object]:
    """The arguments every result object medserve makes gives highdicom: a new series of one new instance,
    made by medserve."""
    return {
        "series_instance_uid": hd.UID(),
        "series_number": series_number,
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MANUFACTURER,
        "software_versions": SOFTWARE_VERSION,
        "series_description": description[:64],
    }


def build_segmentation(mask: np.ndarray, source: DicomSource, spec: ModelSpec) -> hd.seg.Segmentation:
    """The mask as a DICOM Segmentation on ``source``'s frames.

    Args:
        mask: (I, J, K) uint8 label values of ``spec``, on the grid ``source`` describes: slice ``mask[:, :, k]``
            is source frame ``source.slices[k]``, its (rows, columns) image ``mask[:, :, k].T``.
        source: the headers of the series' single-frame images, or of its one multi-frame image.
        spec: the model that made the mask: the segments' names and codes, the algorithm's name and version.

    Raises ``ValueError`` for a source that a SEG cannot reference frame by frame: several multi-frame images,
    or one whose frames are not exactly the volume's slices.
    """
    images, frame_slices = _source_frames(source)
    numbers = segment_numbers(spec)
    to_segment = np.zeros(256, np.uint8)  # label value -> segment number; the background stays 0
    to_segment[list(numbers)] = list(numbers.values())
    # (I, J, F) -> (F, rows, columns): frame f is the mask's slice frame_slices[f], as an image.
    frames = to_segment[mask[:, :, frame_slices]].transpose(2, 1, 0)
    algorithm = algorithm_identification(spec)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.labels[label].name,
            segmented_property_category=coded(spec.labels[label].category),
            segmented_property_type=coded(spec.labels[label].property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            # The SR's measurement group of this segment carries the same identifiers, which ties the two.
            tracking_uid=hd.UID(),
            tracking_id=spec.labels[label].name,
        )
        for label, number in numbers.items()
    ]
    return hd.seg.Segmentation(
        source_images=images,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        device_serial_number=_DEVICE_SERIAL_NUMBER,
        **new_series(SEG_SERIES_NUMBER, f"{spec.name} {spec.version}"),
        content_description=f"Segmentation by model {spec.name} {spec.version}"[:64],
        # A SEG holds at least one frame: with nothing segmented it keeps every (empty) frame, which highdicom
        # would otherwise do after a warning.
        omit_empty_frames=bool(frames.any()),
    )


def _source_frames(source: DicomSource) -> tuple[list[pydicom.Dataset], list[int]]:
    """The source images as highdicom takes them, and the volume slice of each SEG frame.

    highdicom pairs SEG frame ``f`` with ``source_images[f]`` for single-frame images, and with frame ``f + 1``
    of the one multi-frame image: its frames keep the order the image stores them in, whatever the volume's.
    """
    if all(part.frame is None for part in source.slices):  # single-frame images, one per slice
        images = [_copyable(source.instances[part.instance]) for part in source.slices]
        return images, list(range(len(images)))
    if len(source.instances) != 1:
        raise ValueError(
            f"a DICOM SEG references one multi-frame image or single-frame images; the source has "
            f"{len(source.instances)} instances with frames"
        )
    image = source.instances[0]
    slice_of_frame = {part.frame: k for k, part in enumerate(source.slices)}
    frame_count = int(image.get("NumberOfFrames", 1))
    if sorted(slice_of_frame) != list(range(1, frame_count + 1)):
        raise ValueError(f"the volume's slices are not exactly the {frame_count} frames of its multi-frame image")
    return [_copyable(image)], [slice_of_frame[f] for f in range(1, frame_count + 1)]


def _copyable(image: pydicom.Dataset) -> pydicom.Dataset:
    """``image``, or a shallow copy of it in which the patient and study attributes highdicom copies are fit to copy:
    a missing one added empty (they are Type 2), one whose value highdicom would refuse emptied."""
    unfit = [keyword for keyword in COPIED_TYPE_2 if keyword not in image or not _fit_to_copy(keyword, image)]
    if not unfit:
        return image
    image = pydicom.Dataset(image)
    for keyword in unfit:
        setattr(image, keyword, None)
    return image


def _fit_to_copy(keyword: str, image: pydicom.Dataset) -> bool:
    value = image[keyword].value
    if value in (None, ""):
        return True
    if keyword == "PatientSex":
        return value in _PATIENT_SEX_CODES
    if parse := _PARSED_AS.get(keyword):
        try:
            parse(value)
        except ValueError:
            return False
    return True
