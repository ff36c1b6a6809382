"""wsidicom's DICOMweb source: a DICOM whole-slide image read straight from a configured PACS by its study and
series UIDs, tiles fetched as frames (WADO-RS) when a region needs them.

The PACS is one of the ``pacs`` config section, with its address and credentials from there (``PacsClient``'s
session): a request names it, and the tenancy check (``serve_app.wsi.jobs``) has passed before a ``DicomwebSlide``
is made. What is read of the series is what ``WsiDicomSlide`` reads of a folder: the first pyramid, optical path
and focal plane, 8-bit RGB.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve_app.config.pacs import PacsConfig
from serve_app.dicomweb.pacs_client import PacsClient
from serve_app.errors import InvalidSlide, NotFoundAtPacs, PacsFailed
from serve_app.wsi.readers.slide import SlideLevel
from serve_app.wsi.readers.wsidicom_reader import WsiDicomSlide

__all__ = ["DicomwebSlide", "WsiDicomWebSlide"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DicomwebSlide:
    """A slide on a configured PACS, its tenancy checked: which PACS (its config, not the request's address) and
    which series. Equal, and hashed, by PACS name and UIDs (a replica keeps it open by that key)."""

    pacs: str
    config: PacsConfig = field(compare=False, repr=False)
    study_instance_uid: str
    series_instance_uid: str

    def __str__(self) -> str:  # never in logs (UIDs), only in the tenant's own job record
        return f"dicomweb:{self.pacs}/{self.study_instance_uid}/{self.series_instance_uid}"


class WsiDicomWebSlide(WsiDicomSlide):
    """``WsiDicom.open_web`` on a series of a configured PACS: frames fetched by WADO-RS as regions need them."""

    reader = "wsidicom"

    def __init__(self, source: DicomwebSlide, mpp: float | None):
        from wsidicom import WsiDicom, WsiDicomWebClient
        from wsidicom.errors import WsiDicomNotFoundError

        self.source = source
        self.path = Path(str(source))
        self._pacs = PacsClient(source.pacs, source.config)
        with self._translated("opening the series"), warnings.catch_warnings():
            # pydicom warns of each bulk-data attribute (an ICC profile) the metadata points to: not read, not needed.
            warnings.simplefilter("ignore")
            try:
                wsi = WsiDicom.open_web(
                    WsiDicomWebClient(self._pacs.web), source.study_instance_uid, source.series_instance_uid
                )
            except WsiDicomNotFoundError as error:
                raise InvalidSlide(
                    f"the series on PACS {source.pacs} holds no DICOM whole-slide image levels (VL Whole Slide "
                    "Microscopy instances of image type VOLUME); name the series of a slide"
                ) from error
        try:
            self._take(wsi, mpp)
        except BaseException:
            self._pacs.session.close()
            raise

    def _read_region(self, level: SlideLevel, x: int, y: int, width: int, height: int) -> np.ndarray:
        with self._translated("reading the slide's tiles"):
            return super()._read_region(level, x, y, width, height)

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """The PACS's failures as ``PacsClient.translated`` words them (never the URL, which holds the UIDs), as the
        slide's: a slide that cannot be read fails that slide of the job (422), whatever the PACS did; the reason
        says when submitting the job again may work."""
        try:
            with self._pacs.translated(doing):
                yield
        except NotFoundAtPacs as failure:
            raise InvalidSlide(failure.reason) from None
        except PacsFailed as failure:
            logger.info("a DICOMweb slide's PACS failed: %s", failure.reason)
            later = "; submit the job again later" if failure.transient else ""
            raise InvalidSlide(failure.reason + later) from None

    def close(self) -> None:
        super().close()
        self._pacs.session.close()
