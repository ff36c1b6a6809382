from pathlib import Path

from serve_app.config import LimitsConfig
from serve_app.studies.dicom_series import read_dicom_series
from serve_app.studies.header_processes import HeaderProcesses
from serve_app.studies.nifti import read_nifti
from serve_app.studies.upload import sort_upload
from serve_app.studies.volume import Volume


def read_study(folder: Path, limits: LimitsConfig, parsers: HeaderProcesses | None = None) -> Volume:
    """The one volume an upload folder holds; ``RequestError`` subclasses say why not. ``parsers`` parse a DICOM
    series' headers in their processes when given."""
    contents = sort_upload(Path(folder), limits)
    if contents.nifti:
        return read_nifti(contents.nifti[0], limits)
    return read_dicom_series(contents.dicom, limits, parsers)
