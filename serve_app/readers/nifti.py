"""Read a NIfTI image (``.nii`` or ``.nii.gz``) into a ``Volume`` with nibabel."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from serve_app.config import Limits
from serve_app.errors import InvalidStudy, PayloadTooLarge
from serve_app.volume import Volume


def read_nifti(path: Path, limits: Limits) -> Volume:
    try:
        image = nib.load(path)
        shape = image.shape
    except Exception:  # nibabel raises several types for a bad header or bad gzip
        raise InvalidStudy("the NIfTI image is corrupt or not NIfTI-1/2") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InvalidStudy(f"the NIfTI image has shape {tuple(shape)}; a 3D volume is needed")
    if int(np.prod(shape)) > limits.max_volume_voxels:
        raise PayloadTooLarge(f"the image has {np.prod(shape)} voxels, over this server's limit of {limits.max_volume_voxels}")
    try:
        array = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception:
        raise InvalidStudy("the NIfTI image's voxel data is truncated or unreadable") from None
    return Volume(array=array, affine=np.asarray(image.affine, dtype=np.float64))
