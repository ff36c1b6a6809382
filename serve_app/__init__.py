"""medserve: a Ray Serve inference cluster for medical imaging."""

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it, DICOM results carry it
