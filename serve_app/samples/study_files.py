"""Write volumes as real DICOM CT series (pydicom) and NIfTI files (nibabel)."""

from __future__ import annotations

import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from serve_app.studies.volume import LPS_TO_RAS, Volume, spacing_of

_INTERCEPT = -1024.0

# What a scanner writes about the patient; tests set real-looking values to prove none leaks.
DEFAULT_PATIENT = {
    "PatientName": "PHANTOM^ORGAN",
    "PatientID": "PHANTOM-0001",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "AccessionNumber": "ACC0001",
}


def write_ct_series(
    volume: Volume,
    folder: Path,
    patient: dict | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> list[Path]:
    """One CT Image Storage file per slice, int16 stored values with a rescale to HU."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    affine_lps = LPS_TO_RAS @ np.asarray(volume.affine, dtype=float)
    sx, sy, sz = spacing_of(volume.affine)
    row_dir, col_dir = affine_lps[:3, 0] / sx, affine_lps[:3, 1] / sy
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    now = datetime.datetime.now()
    stored = np.clip(np.rint(volume.array - _INTERCEPT), -32768, 32767).astype(np.int16)
    paths = []
    for k in range(volume.shape[2]):
        ds = _ct_slice_dataset(patient or DEFAULT_PATIENT, study_uid, series_uid, frame_uid, now)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in affine_lps[:3, 3] + k * affine_lps[:3, 2]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(sy), float(sx)]  # row spacing, then column spacing
        ds.SliceThickness = float(sz)
        ds.SliceLocation = float(ds.ImagePositionPatient[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"slice-{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_slice_dataset(patient: dict, study_uid: str, series_uid: str, frame_uid: str, now) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = CTImageStorage
    for keyword, value in patient.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
    ds.Modality = "CT"
    ds.Manufacturer = "medserve phantom"
    ds.SeriesNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _INTERCEPT, 1.0, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    return ds


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, np.asarray(affine, dtype=float)), str(path))
    return Path(path)
