"""A result's volumes as a DICOM Structured Report: a TID 1500 Measurement Report (highdicom), Comprehensive 3D SR.

One measurement group (TID 1411) per foreground label: the volume of its segment in mL (SCT 118565006, UCUM ml),
the segment it measures in the SEG, the source images the segment lies on, the segment's tracking identifiers
and the model as the algorithm. The observer is a device: medserve.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from serve_app.model_repository import ModelSpec
from serve_app.results.codes import MILLILITRE, VOLUME, coded, procedure_reported
from serve_app.results.dicom_seg import MANUFACTURER, new_series, segment_numbers
from serve_app.results.measurements import LabelVolume
from serve_app.studies.dicom_source import DicomSource

__all__ = ["SR_SERIES_NUMBER", "build_measurement_report"]

SR_SERIES_NUMBER = 902  # the SEG's plus one: a PACS lists the report after the segmentation


def build_measurement_report(
    segmentation: pydicom.Dataset, volumes: Sequence[LabelVolume], source: DicomSource, spec: ModelSpec
) -> hd.sr.Comprehensive3DSR:
    """Each label's volume, referencing its segment of ``segmentation``.

    Args:
        segmentation: the DICOM SEG of the result, made by ``build_segmentation`` from ``spec``.
        volumes: each foreground label's volume, as the result reports it.
        source: the headers of the images ``segmentation`` was made on.
        spec: the model that made the result.
    """
    numbers = segment_numbers(spec)
    segments = {int(item.SegmentNumber): item for item in segmentation.SegmentSequence}
    sources = _source_images_of_segments(segmentation)
    algorithm = hd.sr.AlgorithmIdentification(name=spec.name, version=spec.version)
    groups = []
    for volume in volumes:
        number = numbers[volume.label]
        label = spec.labels[volume.label]
        if number in sources:
            referenced = hd.sr.ReferencedSegment(
                sop_class_uid=segmentation.SOPClassUID,
                sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=number,
                source_images=sources[number],
            )
        else:  # an empty segment has no frames, so no source image of its own: it was sought in the whole series
            referenced = hd.sr.ReferencedSegment(
                sop_class_uid=segmentation.SOPClassUID,
                sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(source.instances[0].SeriesInstanceUID),
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=segments[number].TrackingUID, identifier=segments[number].TrackingID
                ),
                referenced_segment=referenced,
                finding_type=coded(label.property_type),
                finding_category=coded(label.category),
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(name=VOLUME, value=volume.volume_ml, unit=MILLILITRE, algorithm_id=algorithm)
                ],
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device_observer(spec)),
        procedure_reported=procedure_reported(source.instances[0].get("Modality")),
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[segmentation, *source.instances],
        content=report,
        **new_series(SR_SERIES_NUMBER, f"{spec.name} {spec.version} volumes"),
        # Complete (nothing is left to add) and final (no later version will change it), but not verified:
        # no person has checked an automatic result.
        is_complete=True,
        is_final=True,
        is_verified=False,
    )


def _device_observer(spec: ModelSpec) -> hd.sr.ObserverContext:
    """medserve running ``spec``'s model, with a UID that is the same in every report of that model version."""
    uid = generate_uid(prefix=None, entropy_srcs=[MANUFACTURER, spec.name, spec.version])
    attributes = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uid, name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=spec.name
    )
    return hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=attributes)


def _source_images_of_segments(segmentation: pydicom.Dataset) -> dict[int, list[hd.sr.SourceImageForSegmentation]]:
    """The source images (and frames, of a multi-frame one) that each non-empty segment's frames were made on,
    from the SEG's per-frame references."""
    # A functional group the same for every frame (the segment, when there is one) may be in the shared groups.
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    # segment number -> source SOP Instance UID -> (its SOP Class UID, the frame numbers referenced in it)
    images_of_segment: dict[int, dict[str, tuple[str, list[int]]]] = defaultdict(dict)
    for frame in segmentation.PerFrameFunctionalGroupsSequence:
        segment_groups = frame if "SegmentIdentificationSequence" in frame else shared
        number = int(segment_groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        derivation_groups = frame if "DerivationImageSequence" in frame else shared
        for derivation in derivation_groups.DerivationImageSequence:
            for image in derivation.SourceImageSequence:
                _, frame_numbers = images_of_segment[number].setdefault(
                    image.ReferencedSOPInstanceUID, (image.ReferencedSOPClassUID, [])
                )
                if "ReferencedFrameNumber" in image:  # a multi-frame source: one value, or several
                    value = image.ReferencedFrameNumber
                    frame_numbers.extend(int(f) for f in (value if isinstance(value, MultiValue) else [value]))
    return {
        number: [
            hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=class_uid,
                referenced_sop_instance_uid=instance_uid,
                referenced_frame_numbers=sorted(set(frame_numbers)) or None,
            )
            for instance_uid, (class_uid, frame_numbers) in images.items()
        ]
        for number, images in images_of_segment.items()
    }
