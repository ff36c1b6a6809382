"""Decoding on the GPU with nvImageCodec gives the CPU decoders' values: compressed DICOM frames voxel for voxel
(lossless syntaxes), slide JPEG tiles within a grey level of libjpeg-turbo's. Without a GPU these are skipped: the
GPU machine runs them (with the gpu extra installed; there a missing nvImageCodec fails them)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import imagecodecs
import numpy as np
import pytest
import torch
from pydicom import uid

from serve_app.samples.encoded_frames import encode_frame
from serve_app.samples.synthetic_slides import write_slide
from serve_app.studies.frame_decoders import FramePixels, decode_frames
from serve_app.wsi.cuda_regions import decode_jpeg_tiles
from serve_app.wsi.slides import open_slide

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU machine runs these)")

PIXELS = FramePixels(rows=96, columns=80, bits_allocated=16, bits_stored=16, pixel_representation=1)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """(24, 96, 80) int16: CT-like values, smooth with noise (what the codecs meet in a series)."""
    rng = np.random.default_rng(5)
    smooth = np.cumsum(rng.normal(0, 40, (24, 96, 80)), axis=2)
    return np.clip(smooth - 1024, -2048, 3071).astype(np.int16)


@pytest.mark.parametrize("syntax", [uid.JPEG2000Lossless, uid.HTJ2KLossless])
def test_gpu_decoded_frames_are_voxel_identical_to_pydicoms(frames, syntax):
    encoded = [encode_frame(frame, syntax) for frame in frames]
    on_gpu = decode_frames(encoded, syntax, PIXELS, decoder="gpu")
    on_cpu = decode_frames(encoded, syntax, PIXELS, decoder="in_process")
    assert on_gpu.dtype == on_cpu.dtype == np.int16
    np.testing.assert_array_equal(on_cpu, frames)
    np.testing.assert_array_equal(on_gpu, on_cpu)


def test_jpeg_lossless_frames_stay_on_the_cpu_where_there_is_a_gpu(frames):
    """nvImageCodec 0.9 decoded these frames wrongly on an H100: "auto" must not hand them to it."""
    encoded = [encode_frame(frame, uid.JPEGLosslessSV1) for frame in frames]
    np.testing.assert_array_equal(decode_frames(encoded, uid.JPEGLosslessSV1, PIXELS), frames)
    with pytest.raises(ValueError, match="no GPU decoder"):
        decode_frames(encoded, uid.JPEGLosslessSV1, PIXELS, decoder="gpu")


# Grey levels from libjpeg-turbo's pixels, at most and on average: the engines decode exactly as libjpeg-turbo
# does; the hybrid decoder's IDCT differs by a few levels at a few pixels (0.2 % of them on an H100).
TOLERANCE = {"hardware": (0, 0.0), "hybrid": (3, 0.05)}


@pytest.mark.parametrize("decoder", sorted(TOLERANCE))
def test_nvimgcodec_tiles_are_within_its_tolerance_of_libjpeg_turbos(tmp_path, decoder):
    write_slide(tmp_path / "slide.tiff", 1024, 768, tile=256, levels=1, seed=3)
    with open_slide(tmp_path / "slide.tiff", reader="tifffile") as slide:
        tiles = slide.jpeg_tiles(0, 0, 0, 1024, 768)
    images = decode_jpeg_tiles(tiles, torch.device("cuda"), decoder)
    assert all(image.device.type == "cuda" for image in images)
    difference = np.concatenate(
        [
            np.abs(image.cpu().numpy().astype(np.int16) - imagecodecs.jpeg8_decode(tile.stream)).ravel()
            for image, tile in zip(images, tiles, strict=True)
        ]
    )
    most, mean = TOLERANCE[decoder]
    assert difference.max() <= most and difference.mean() <= mean, (difference.max(), difference.mean())


@pytest.mark.parametrize("decoder", sorted(TOLERANCE))
def test_nvimgcodec_decodes_for_several_reader_threads_at_once(tmp_path, decoder):
    """A tile-model replica's reader threads decode at once (a shared nvImageCodec decoder killed the replica)."""
    write_slide(tmp_path / "slide.tiff", 1024, 768, tile=256, levels=1, seed=4)
    with open_slide(tmp_path / "slide.tiff", reader="tifffile") as slide:
        tiles = slide.jpeg_tiles(0, 0, 0, 1024, 768)
    expected = [decode_jpeg_tiles(tiles, torch.device("cuda"), decoder)[i].cpu() for i in range(len(tiles))]
    with ThreadPoolExecutor(8) as threads:
        decoded = list(threads.map(lambda _: decode_jpeg_tiles(tiles, torch.device("cuda"), decoder), range(64)))
    assert all(torch.equal(image.cpu(), expected[i]) for images in decoded for i, image in enumerate(images))
