"""The embedded H&E tile classifier: it loads as shipped and tells tumour from normal on tiles it never saw."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from monai.transforms import NormalizeIntensity

from serve_app.samples.synthetic_slides import write_slide_from_region
from serve_app.samples.synthetic_tissue import make_training_tiles
from serve_app.samples.tile_network import (
    TILE_MEAN,
    TILE_MPP,
    TILE_SIZE,
    TILE_STD,
    WEIGHTS_PATH,
    load_tile_network,
    normalise,
    tiles_to_input,
    tumour_probability,
)

# scripts/train_tile_model.py (--seed 1234) draws from seeds 123400-123411 and validates on 123499;
# these it never drew.
FRESH_SEEDS = (7_000_001, 7_000_002)


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    return load_tile_network()


def test_weights_are_a_small_state_dict():
    assert WEIGHTS_PATH.stat().st_size < 5 * 2**20
    state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_accuracy_on_fresh_tiles(network):
    groups = [make_training_tiles(128, seed=seed, size=TILE_SIZE, mpp=TILE_MPP) for seed in FRESH_SEEDS]
    tiles, labels = np.concatenate([g[0] for g in groups]), np.concatenate([g[1] for g in groups])
    assert 0.3 < labels.mean() < 0.7
    predicted = tumour_probability(network, tiles) > 0.5
    assert (predicted == labels).mean() >= 0.9
    for label in (0, 1):  # neither class bought with the other
        assert (predicted[labels == label] == label).mean() >= 0.8


def test_normalise_is_monais_channel_wise_normalize_intensity():
    tiles = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    batch = normalise(tiles_to_input(tiles))
    monai = NormalizeIntensity(subtrahend=TILE_MEAN, divisor=TILE_STD, channel_wise=True)
    for tile, normalised in zip(tiles_to_input(tiles), batch, strict=True):
        assert torch.allclose(torch.as_tensor(monai(tile)), normalised, atol=1e-6)


def test_scores_tiles_of_a_real_he_slide(network, tmp_path):
    slide = write_slide_from_region(tmp_path / "real.tiff", 2 * TILE_SIZE, 2 * TILE_SIZE, mpp=TILE_MPP, levels=1)
    image = tifffile.imread(slide.path, series=0, level=0)
    tiles = image.reshape(2, TILE_SIZE, 2, TILE_SIZE, 3).swapaxes(1, 2).reshape(4, TILE_SIZE, TILE_SIZE, 3)
    probability = tumour_probability(network, tiles)
    assert probability.shape == (4,)
    # Real tissue is scored tile by tile as in a batch: nothing in the network mixes the tiles of a batch.
    one_at_a_time = np.concatenate([tumour_probability(network, tile[None]) for tile in tiles])
    np.testing.assert_allclose(probability, one_at_a_time, atol=1e-5)
    # And the four tiles of different tissue are told apart, not given one constant score.
    assert np.ptp(probability) > 1e-4, probability
