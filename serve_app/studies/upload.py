"""Sort an upload folder into DICOM and NIfTI files, unpacking zip archives safely.

Files are told apart by their bytes, not their names: hospital exports name files anything.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidStudy, PayloadTooLarge, UnsupportedMediaType

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC = b"n+1\x00"  # at byte 344
_NIFTI2_MAGIC = b"n+2\x00"  # at byte 4
_DICOM_MAGIC = b"DICM"


@dataclass
class UploadContents:
    dicom: list[Path] = field(default_factory=list)
    nifti: list[Path] = field(default_factory=list)


def sniff(path: Path) -> str:
    """One of ``zip``, ``nii``, ``nii.gz``, ``dicom`` or ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(352)
    if head[:4] in _ZIP_MAGICS:
        return "zip"
    if head[:2] == _GZIP_MAGIC:
        return "nii.gz"
    if head[344:348] == _NIFTI1_MAGIC or head[4:8] == _NIFTI2_MAGIC:
        return "nii"
    if head[128:132] == _DICOM_MAGIC:
        return "dicom"
    return "unknown"


def sort_upload(folder: Path, limits: LimitsConfig) -> UploadContents:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise InvalidStudy("the upload is empty")
    contents = UploadContents()
    for path in files:
        kind = sniff(path)
        if kind == "zip":
            _add_zip(path, folder / f"{path.name}.unzipped", limits, contents)
        elif kind == "unknown":
            raise UnsupportedMediaType(
                "an uploaded file is not a zip archive, a DICOM file (Part 10, with the DICM preamble) or a NIfTI image"
            )
        else:
            _add_file(path, kind, contents)
    if contents.dicom and contents.nifti:
        raise InvalidStudy("send either one DICOM series or one NIfTI image, not both")
    if len(contents.nifti) > 1:
        raise InvalidStudy(f"the upload holds {len(contents.nifti)} NIfTI images; send one per request")
    if len(contents.dicom) > limits.max_files_per_upload:
        raise PayloadTooLarge(f"the upload holds more than {limits.max_files_per_upload} files")
    return contents


def _add_file(path: Path, kind: str, contents: UploadContents) -> None:
    if kind == "dicom":
        contents.dicom.append(path)
    elif kind in ("nii", "nii.gz"):
        # nibabel tells plain from gzipped NIfTI by the file's extension.
        contents.nifti.append(path.rename(path.with_name(f"{path.name}.{kind}")))


def _add_zip(archive: Path, into: Path, limits: LimitsConfig, contents: UploadContents) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            entries = [e for e in zf.infolist() if not e.is_dir()]
            _check_entries(entries, limits)
            into.mkdir()
            for n, entry in enumerate(entries):
                # Entries are written under a plain counter: their names are untrusted and may carry
                # patient names, so they are neither used as paths nor ever repeated in messages.
                target = into / f"{n:06d}"
                with zf.open(entry) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                _add_file(target, sniff(target), contents)
    except zipfile.BadZipFile:
        raise UnsupportedMediaType("the zip archive is corrupt or truncated") from None
    except RuntimeError as e:  # zipfile's error for encrypted entries
        raise InvalidStudy("the zip archive has encrypted entries; send it unencrypted") from e
    if not contents.dicom and not contents.nifti:
        raise InvalidStudy("the zip archive holds no DICOM or NIfTI files")


def _check_entries(entries: list[zipfile.ZipInfo], limits: LimitsConfig) -> None:
    if not entries:
        raise InvalidStudy("the zip archive is empty")
    if len(entries) > limits.max_files_per_upload:
        raise PayloadTooLarge(f"the zip archive holds more than {limits.max_files_per_upload} files")
    for entry in entries:
        name = PurePosixPath(entry.filename.replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts or ":" in entry.filename:
            raise InvalidStudy("a zip entry's path leaves the archive (absolute, a drive, or '..'); refused")
    # The sizes in the directory can lie; copyfileobj stops at the real end, and the total below
    # bounds what a zip bomb that tells the truth can cost.
    if sum(e.file_size for e in entries) > limits.max_upload_bytes:
        raise PayloadTooLarge(f"the zip archive unpacks to more than {limits.max_upload_bytes} bytes")
