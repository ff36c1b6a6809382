"""Compressed DICOM frames decoded as one batch (``serve_app.studies.frame_decoders``) in worker processes give
pydicom's own values, voxel for voxel, in every lossless syntax the batch takes; a series read through the reader
does too; a corrupt frame is a 422. Real codecs, real processes; no Ray, no GPU (``test_gpu_decode.py`` has it)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.encaps import encapsulate

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidStudy
from serve_app.samples.encoded_frames import encode_frame
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series
from serve_app.studies.dicom_series import read_dicom_series
from serve_app.studies.frame_decoders import FramePixels, decode_frames
from serve_app.studies.header_processes import HeaderProcesses

SYNTAXES = [uid.RLELossless, uid.JPEG2000Lossless, uid.HTJ2KLossless, uid.JPEGLosslessSV1]
PIXELS = FramePixels(rows=48, columns=40, bits_allocated=16, bits_stored=16, pixel_representation=1)


@pytest.fixture(scope="module")
def processes():
    pool = HeaderProcesses(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """(40, 48, 40) int16, CT-like: enough frames for two runs of the processes (16 frames a run at least)."""
    rng = np.random.default_rng(7)
    return np.clip(np.cumsum(rng.normal(0, 60, (40, 48, 40)), axis=2) - 1024, -2048, 3071).astype(np.int16)


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.keyword)
def test_frames_decoded_in_processes_are_pydicoms_values(frames, syntax, processes):
    encoded = [encode_frame(frame, syntax) for frame in frames]
    in_processes = decode_frames(encoded, syntax, PIXELS, processes, decoder="processes")
    ds = pydicom.Dataset()
    ds.update(
        dict(Rows=48, Columns=40, SamplesPerPixel=1, BitsAllocated=16, BitsStored=16, HighBit=15)
        | dict(PixelRepresentation=1, PhotometricInterpretation="MONOCHROME2", NumberOfFrames=len(frames))
    )
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate(encoded)
    assert in_processes.dtype == np.int16 and in_processes.shape == frames.shape
    np.testing.assert_array_equal(in_processes, ds.pixel_array)
    np.testing.assert_array_equal(in_processes, frames)


def test_a_corrupt_frame_is_a_422_naming_the_syntax(frames, processes):
    encoded = [encode_frame(frame, uid.JPEG2000Lossless) for frame in frames]
    encoded[20] = encoded[20][:40]
    with pytest.raises(InvalidStudy, match="JPEG 2000"):
        decode_frames(encoded, uid.JPEG2000Lossless, PIXELS, processes, decoder="processes")


def test_a_compressed_series_reads_as_its_uncompressed_self(tmp_path, processes):
    """The reader hands a series of compressed single-frame files to the batch decoder, in the processes."""
    volume = ct_phantom(np.random.default_rng(1), shape=(48, 40, 34)).volume
    plain = write_ct_series(volume, tmp_path / "plain")
    compressed = []
    for path in plain:
        ds = pydicom.dcmread(path)
        ds.compress(uid.RLELossless)
        ds.save_as(tmp_path / path.name)
        compressed.append(tmp_path / path.name)
    expected = read_dicom_series(plain, LimitsConfig()).array
    np.testing.assert_array_equal(read_dicom_series(compressed, LimitsConfig(), processes).array, expected)
