"""Turn an uploaded folder (zip, DICOM files, NIfTI) into one ``Volume``."""

from serve_app.readers.study import read_study

__all__ = ["read_study"]
