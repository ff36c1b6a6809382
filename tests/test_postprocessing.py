"""Postprocessing in the foreground's box gives exactly the mask of postprocessing the whole grid."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from serve_app.segmentation.transforms import (
    keep_largest_component,
    mask_on_grid,
    resample_to_grid,
    to_labels,
    to_probabilities,
)


def whole_grid_mask(logits, model_affine, grid_affine, grid_shape, foreground):
    probabilities = resample_to_grid(to_probabilities(logits), model_affine, grid_affine, grid_shape)
    return keep_largest_component(to_labels(probabilities), foreground)[0].to(torch.uint8)


def blobs(rng, shape, labels, at_edge=False) -> torch.Tensor:
    """Logits with an organ per foreground label, stray islands beside it, and noise."""
    logits = torch.as_tensor(rng.normal(0, 0.5, (labels, *shape)), dtype=torch.float32)
    logits[0] += 4.0
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    for label in range(1, labels):
        organ = np.asarray(shape) - 3.0 if at_edge else rng.uniform(6, np.asarray(shape) - 6)
        # Islands beside the organ and one anywhere: the largest-component step must remove them.
        stray = rng.uniform(0, np.asarray(shape) - 1)  # anywhere: a false positive far from the organ
        for centre, radius in [
            (organ, 4.0),
            (organ + rng.uniform(-7, 7, 3), 1.2),
            (organ + rng.uniform(-7, 7, 3), 1.2),
            (stray, 1.5),
        ]:
            logits[label][torch.as_tensor(np.linalg.norm(grid - centre, axis=-1) < radius)] += 8.0
    return logits


def tilted_affine(rng, model_shape, spacing, centre) -> np.ndarray:
    """A model grid tilted a few degrees and centred on ``centre`` (mm)."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_rotvec(rng.normal(0, 0.15, 3)).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(model_shape) - 1) / 2)
    return affine


def covering_affine(grid_affine, grid_shape, model_shape) -> np.ndarray:
    """The model grid that preprocessing's resize makes: the image's extent in fewer, larger voxels."""
    scale = np.asarray(grid_shape) / np.asarray(model_shape)
    resize = np.eye(4)
    resize[:3, :3] = np.diag(scale)
    resize[:3, 3] = (scale - 1) / 2
    return grid_affine @ resize


# On the GPU machine the GPU path (cuCIM's connected components) is checked too.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
# The image is stored flipped (as a DICOM series in LPS order can be), in 1 mm voxels.
GRID_SHAPE, MODEL_SHAPE = (61, 53, 37), (24, 24, 16)
GRID_AFFINE = np.array([[-1.0, 0, 0, 60], [0, 1, 0, 0], [0, 0, -1, 36], [0, 0, 0, 1]])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("labels", [2, 3])
# A tilted grid's corners lie outside the image, and components are judged on the model's grid: an
# organ in such a corner may be the model grid's largest and yet the image's smallest.
@pytest.mark.parametrize("model_grid, at_edge", [("resized", False), ("resized", True), ("tilted", False)])
@pytest.mark.parametrize("device", DEVICES)
def test_boxed_mask_is_the_whole_grid_mask(seed, labels, model_grid, at_edge, device):
    rng = np.random.default_rng(seed)
    if model_grid == "resized":
        model_affine = covering_affine(GRID_AFFINE, GRID_SHAPE, MODEL_SHAPE)
    else:
        model_affine = tilted_affine(rng, MODEL_SHAPE, [2.6, 2.3, 2.4], centre=[30.0, 26.0, 18.0])
    logits = blobs(rng, MODEL_SHAPE, labels, at_edge).to(device)
    foreground = list(range(1, labels))

    boxed = mask_on_grid(logits, model_affine, GRID_AFFINE, GRID_SHAPE, foreground)
    expected = whole_grid_mask(logits, model_affine, GRID_AFFINE, GRID_SHAPE, foreground)
    assert expected.sum() > 0
    assert torch.equal(boxed.full(), expected)


def test_the_box_is_the_organ_not_the_image():
    logits = torch.zeros((2, 32, 32, 32))
    logits[1, 12:18, 10:16, 14:20] = 10.0  # 6 model voxels a side: 12 image voxels
    grid_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    boxed = mask_on_grid(logits, np.eye(4), grid_affine, (64, 64, 64), [1])
    assert 12**3 <= boxed.labels.sum() <= 13**3  # one image voxel either side is the interpolation's to call
    assert all(n <= 12 + 6 for n in boxed.labels.shape), boxed.labels.shape


def test_no_foreground_gives_an_empty_mask():
    logits = torch.zeros((2, 8, 8, 8))
    logits[0] += 5
    boxed = mask_on_grid(logits, np.eye(4), np.eye(4), (16, 16, 16), [1])
    assert boxed.full().shape == (16, 16, 16) and boxed.full().sum() == 0
