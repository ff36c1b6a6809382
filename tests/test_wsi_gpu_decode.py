"""Slide tiles decoded on the GPU (nvJPEG) give the CPU decoder's pixels, and the classifier's answers.
Without a GPU these are skipped: the GPU machine runs them (benchmarks/wsi_gpu_session.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.model_repository import ModelRepository
from serve_app.samples.synthetic_slides import write_slide
from serve_app.wsi.cuda_regions import CudaRegions
from serve_app.wsi.slides import open_slide
from serve_app.wsi.tile_classifier import TileClassifier
from serve_app.wsi.tiling import plan_grid, read_tile_block

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU machine runs these)")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-decode") / "slide.tiff"
    write_slide(path, 2500, 1900, seed=2)
    with open_slide(path, reader="tifffile") as opened:
        yield opened


@pytest.mark.parametrize(
    "box", [(0, 0, 0, 600, 500), (0, 2300, 1700, 400, 400), (1, 100, 50, 1250, 950), (0, -9, -9, 40, 40)]
)
def test_gpu_decoded_regions_match_the_cpu_decoder_within_jpeg_rounding(slide, box):
    on_cpu = slide.read_region(*box).astype(np.int16)
    on_gpu = CudaRegions(slide, torch.device("cuda")).read_region(*box)
    assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape
    difference = np.abs(on_gpu.cpu().numpy().astype(np.int16) - on_cpu)
    # nvJPEG and libjpeg-turbo round their IDCT and chroma upsampling differently: measured on the H200,
    # at most 18 grey levels on an edge, 0.5 on average.
    assert difference.max() <= 32 and difference.mean() < 1.0, (difference.max(), difference.mean())


def test_gpu_decoded_tiles_get_the_cpu_decoded_tiles_probabilities(slide):
    grid = plan_grid(slide, tile_size=224, mpp=0.5)
    rows, cols = range(0, min(4, grid.rows)), range(0, min(4, grid.cols))
    classifier = TileClassifier(ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("he-tile-tumour"), "cuda")
    on_cpu = classifier(read_tile_block(slide, grid, rows, cols).reshape(-1, 224, 224, 3))
    on_gpu = classifier(
        read_tile_block(CudaRegions(slide, torch.device("cuda")), grid, rows, cols).reshape(-1, 224, 224, 3)
    )
    np.testing.assert_allclose(on_gpu, on_cpu, atol=0.05)
