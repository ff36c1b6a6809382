"""Read a NIfTI image (``.nii`` or ``.nii.gz``) into a ``Volume`` with nibabel."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidStudy, PayloadTooLarge
from serve_app.studies.checks import check_affine, check_finite_voxels
from serve_app.studies.volume import Volume

__all__ = ["read_nifti"]

# Kept as stored when torch has the type (unsigned 16/32-bit it has only in part); float64,
# which scaling gives, is halved to float32 here.
_TORCH_DTYPES = {np.dtype(t) for t in ("uint8", "int8", "int16", "int32", "int64", "float16", "float32")}


def read_nifti(path: Path, limits: LimitsConfig) -> Volume:
    """A NIfTI image as a ``Volume``: its (I, J, K) voxels as stored (or scaled), its affine (voxel -> RAS mm).

    Raises ``InvalidStudy`` (422) for a corrupt file, a shape other than 3D, a degenerate affine or
    non-finite voxels, and ``PayloadTooLarge`` (413) over ``limits.max_volume_voxels``, judged from the header.
    """
    try:
        image = nib.load(path)
        shape = image.shape
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception:  # nibabel raises several types for a bad header or bad gzip
        raise InvalidStudy("the NIfTI image is corrupt or not NIfTI-1/2") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InvalidStudy(f"the NIfTI image has shape {tuple(shape)}; a 3D volume is needed")
    if min(shape) < 1:
        raise InvalidStudy(f"the NIfTI image has shape {tuple(shape)}; every dimension needs at least one voxel")
    check_affine(affine, "the NIfTI image's affine")
    voxels = math.prod(shape)  # Python's integers: NIfTI-2's 64-bit dimensions would overflow numpy's product to 0
    if voxels > limits.max_volume_voxels:
        raise PayloadTooLarge(f"the image has {voxels} voxels, over this server's limit of {limits.max_volume_voxels}")
    try:
        # Scaled if the header says so, else as stored (int16 for CT): widened to float on the device.
        array = np.asanyarray(image.dataobj).reshape(shape)
    except Exception:
        raise InvalidStudy("the NIfTI image's voxel data is truncated or unreadable") from None
    if array.dtype.kind not in "iuf":
        raise InvalidStudy(f"the NIfTI image's voxels are of type {array.dtype}; numbers are needed")
    if array.dtype not in _TORCH_DTYPES:
        array = array.astype(np.float32)
    check_finite_voxels(array, "the NIfTI image")
    return Volume(array=array, affine=affine)
