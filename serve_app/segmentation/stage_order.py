"""``run_stages``: the order a segmentation request's three stages run in, whichever layout reaches them.

Apart from the stages themselves (``serve_app.segmentation.stages``), so that a process that only drives them
through handles (the ingress, the DICOM node) does not import what they run on: torch's models, MONAI, the readers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from serve_app.results.measurements import LabelVolume
from serve_app.segmentation.messages import Array, Prediction, PreparedStudy, Segmentation, StageTimings
from serve_app.stopwatch import Stopwatch

__all__ = ["run_stages"]


async def run_stages(
    preprocess: Callable[[], Awaitable[PreparedStudy]],
    predict: Callable[[Array], Awaitable[Prediction]],
    postprocess: Callable[[Prediction, PreparedStudy], Awaitable[list[LabelVolume]]],
) -> Segmentation:
    """One request through the three stages, however a layout reaches them (methods, or handles), timed
    here as the request waits on each."""
    watch = Stopwatch()
    prepared = await preprocess()
    preprocess_s = watch.lap()
    prediction = await predict(prepared.image)
    model_round_trip_s = watch.lap()
    labels = await postprocess(prediction, prepared)
    return Segmentation(
        grid=dataclasses.replace(prepared.grid, source=None),  # the headers stay with the result, not the answer
        dicom_source=prepared.grid.source is not None,
        labels=labels,
        batch_size=prediction.batch_size,
        study_instance_uid=prepared.study_instance_uid,
        timings=StageTimings(
            preprocess=preprocess_s,
            model_queue=max(model_round_trip_s - prediction.compute_s, 0.0),
            model=prediction.compute_s,
            postprocess=watch.lap(),
        ),
    )
