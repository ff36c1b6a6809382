"""GPU pre/postprocessing gives the CPU path's answer. On a machine without a GPU these are skipped:
there the CPU fallback is what runs, and every other test covers it."""

import numpy as np
import pytest
import torch

from helpers import dice
from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.engines import load_engine
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import EngineSpec
from serve_app.samples.phantoms import ct_phantom
from serve_app.segmentation.transforms import mask_on_grid, to_model_input

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU machine runs these)")


@pytest.fixture(scope="module")
def spec():
    return ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("ct-phantom-organ")


def segment(spec, phantom, device, **engine):
    spec = spec.model_copy(update={"engine": EngineSpec(**engine)})
    image = to_model_input(phantom.volume, spec.preprocessing, device)
    logits = load_engine(spec, device)(image.as_tensor()[None])[0]
    return (
        mask_on_grid(logits, image.affine, phantom.volume.affine, phantom.volume.shape, spec.foreground_labels)
        .full()
        .cpu()
        .numpy()
    )


@needs_gpu
@pytest.mark.parametrize(
    "engine", [{}, {"precision": "fp16", "channels_last": True}, {"precision": "fp16", "cuda_graphs": True}]
)
def test_gpu_path_matches_cpu_path(spec, engine):
    phantom = ct_phantom(np.random.default_rng(20_010))
    on_cpu = segment(spec, phantom, "cpu")
    on_gpu = segment(spec, phantom, "cuda", **engine)
    assert dice(on_gpu == 1, on_cpu == 1) >= 0.99
    assert dice(on_gpu == 1, phantom.label) >= 0.9


@needs_gpu
def test_largest_component_runs_through_cucim_on_gpu():
    from monai.transforms.utils import get_largest_connected_component_mask

    pytest.importorskip("cucim")
    labels = torch.zeros((1, 64, 64, 64), device="cuda")
    labels[0, 5:30, 5:30, 5:30] = 1
    labels[0, 40:45, 40:45, 40:45] = 1
    largest = get_largest_connected_component_mask(labels)
    assert largest.device.type == "cuda" and int(largest.sum()) == 25**3


def test_cpu_fallback_ignores_gpu_only_engine_options(spec):
    # fp16, channels-last and CUDA graphs are CUDA features; on a CPU the same model.yaml must still serve.
    phantom = ct_phantom(np.random.default_rng(20_011))
    plain = segment(spec, phantom, "cpu")
    tuned = segment(spec, phantom, "cpu", precision="fp16", channels_last=True, cuda_graphs=True)
    np.testing.assert_array_equal(plain, tuned)
