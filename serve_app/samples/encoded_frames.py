"""Compressed DICOM frames for tests and benchmarks of the frame decoders."""

from __future__ import annotations

import imagecodecs
import numpy as np
from pydicom import uid
from pydicom.pixels import get_encoder

__all__ = ["encode_frame"]


def encode_frame(frame: np.ndarray, syntax: str) -> bytes:
    """One (rows, columns) int16 frame encoded in ``syntax``: pydicom's encoders where it has one (RLE, JPEG 2000),
    imagecodecs' for HTJ2K (OpenJPH) and JPEG lossless (libjpeg-turbo 3), which pydicom cannot write."""
    if syntax == uid.HTJ2KLossless:
        return imagecodecs.htj2k_encode(frame, level=0)
    if syntax == uid.JPEGLosslessSV1:
        return imagecodecs.jpeg8_encode(frame.view(np.uint16), lossless=True, predictor=1)
    return get_encoder(syntax).encode(
        frame.tobytes(),
        rows=frame.shape[0],
        columns=frame.shape[1],
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=16,
        pixel_representation=1,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
    )
