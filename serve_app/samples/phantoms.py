"""Synthetic CT phantoms: a body of fat, soft tissue and bone in HU, with an organ to segment.

They train the embedded default model (``scripts/train_default_model.py``), feed the demo
and the tests, and always come with their ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve_app.studies.volume import LPS_TO_RAS, Volume


@dataclass
class Phantom:
    volume: Volume  # HU, float32
    label: np.ndarray  # uint8, 1 inside the organ


def ct_phantom(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (128, 128, 40),
    spacing: tuple[float, float, float] = (2.7, 2.7, 5.0),
) -> Phantom:
    """An axial CT-like volume indexed [column, row, slice] like a DICOM series."""
    sx, sy, sz = spacing
    # Patient-space millimetres (LPS) of every voxel centre, origin at the volume's centre.
    x = (np.arange(shape[0]) - (shape[0] - 1) / 2) * sx
    y = (np.arange(shape[1]) - (shape[1] - 1) / 2) * sy
    z = (np.arange(shape[2]) - (shape[2] - 1) / 2) * sz
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    half_fov = min(x[-1], y[-1])

    hu = np.full(shape, -1000.0, dtype=np.float32)
    body_a, body_b = rng.uniform(0.70, 0.85) * half_fov, rng.uniform(0.50, 0.65) * half_fov
    body = (X / body_a) ** 2 + (Y / body_b) ** 2 <= 1
    hu[body] = rng.uniform(-110, -80)  # subcutaneous fat
    fat = rng.uniform(8, 16)
    inner = (X / (body_a - fat)) ** 2 + (Y / (body_b - fat)) ** 2 <= 1
    hu[inner] = rng.uniform(30, 50)  # soft tissue

    # A liver-like large region of lower enhancement than the organ, so intensity alone is not the answer.
    liver = _ellipsoid(
        X,
        Y,
        Z,
        (-0.35 * body_a, -0.1 * body_b, 0),
        (0.45 * body_a, 0.6 * body_b, 0.8 * z[-1] + 40),
        rng.uniform(-0.3, 0.3),
    )
    hu[liver & inner] = rng.uniform(55, 70)
    spine = (X**2 + (Y - 0.6 * body_b) ** 2) <= rng.uniform(11, 16) ** 2
    hu[spine & inner] = rng.uniform(500, 800)
    for _ in range(rng.integers(2, 5)):  # vessels: small, brighter than the organ
        cx, cy = rng.uniform(-0.4, 0.4) * body_a, rng.uniform(-0.3, 0.3) * body_b
        vessel = ((X - cx) ** 2 + (Y - cy) ** 2) <= rng.uniform(3, 6) ** 2
        hu[vessel & inner] = rng.uniform(150, 220)

    # The organ: spleen-like, in the patient's left half, brighter than the liver.
    longest = min(60.0, 0.9 * z[-1] + 10)
    radii = (rng.uniform(22, 40), rng.uniform(18, 32), rng.uniform(min(25.0, longest / 2), longest))
    centre = (
        rng.uniform(0.25, 0.5) * body_a,
        rng.uniform(-0.2, 0.25) * body_b,
        rng.uniform(-0.3, 0.3) * z[-1],
    )
    organ = _ellipsoid(X, Y, Z, centre, radii, rng.uniform(-0.6, 0.6)) & inner & ~spine
    hu[organ] = rng.uniform(95, 135)

    hu += rng.normal(0, rng.uniform(8, 18), shape).astype(np.float32)
    affine_lps = np.diag([sx, sy, sz, 1.0])
    affine_lps[:3, 3] = (x[0], y[0], z[0])
    volume = Volume(array=hu, affine=LPS_TO_RAS @ affine_lps, modality="CT")
    return Phantom(volume=volume, label=organ.astype(np.uint8))


def _ellipsoid(X, Y, Z, centre, radii, angle) -> np.ndarray:
    dx, dy, dz = X - centre[0], Y - centre[1], Z - centre[2]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2 <= 1
