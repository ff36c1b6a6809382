"""The embedded default model really segments: Dice >= 0.9 on phantoms it never saw in training."""

import numpy as np
import pytest
import torch

from helpers import dice
from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.engines import load_engine
from serve_app.model_repository import ModelRepository
from serve_app.samples.phantoms import ct_phantom
from serve_app.segmentation.transforms import mask_on_grid, to_model_input

# Seeds from 10_000 on are never drawn by the training script; shapes and spacings vary like its data.
FRESH = [
    (20_001, (128, 128, 40), (2.7, 2.7, 5.0)),
    (20_002, (160, 160, 56), (2.0, 2.0, 4.0)),
    (20_003, (96, 96, 30), (3.6, 3.6, 6.0)),
    (20_004, (128, 128, 48), (3.0, 3.0, 3.5)),
    (20_005, (112, 112, 36), (2.9, 2.9, 5.5)),
]


@pytest.fixture(scope="module")
def model():
    spec = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("ct-phantom-organ")
    return spec, load_engine(spec, "cpu")


@pytest.mark.parametrize("seed,shape,spacing", FRESH)
def test_dice_on_unseen_phantoms(model, seed, shape, spacing):
    spec, engine = model
    phantom = ct_phantom(np.random.default_rng(seed), shape=shape, spacing=spacing)
    image = to_model_input(phantom.volume, spec.preprocessing)
    with torch.inference_mode():
        logits = engine(image.as_tensor()[None])[0]
    mask = (
        mask_on_grid(logits, image.affine, phantom.volume.affine, phantom.volume.shape, spec.foreground_labels)
        .full()
        .numpy()
    )
    assert mask.shape == phantom.volume.shape
    assert dice(mask == 1, phantom.label) >= 0.9
