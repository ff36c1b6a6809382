"""``PacsClient``: one configured PACS: series retrieved by WADO-RS, results stored by STOW-RS (``dicomweb-client``).

Its calls block (``requests`` underneath): the ingress runs them in a thread. Every failure of the PACS
or of the way to it leaves here as a medserve error, translated in one place (``PacsClient.translated``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.errors import InvalidDicomError
from python_multipart.exceptions import MultipartParseError

from serve_app.config.pacs import PacsConfig
from serve_app.dicomweb.multipart import DicomPartFiles, multipart_related_boundary
from serve_app.errors import NotFoundAtPacs, PacsFailed
from serve_app.studies.upload import UploadBudget

__all__ = ["PacsClient"]

# dicomweb-client logs the URLs it calls, and they hold study and series UIDs: kept out of the logs.
logging.getLogger("dicomweb_client").setLevel(logging.ERROR)

# Ask for the instances as the PACS stores them: transcoding is its work and may lose precision.
_AS_STORED = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
_CHUNK = 1 << 20
# Answers worth another try of a store-back: the PACS is busy or restarting. Another 4xx will not change.
_TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)
_FIRST_PAUSE_S = 1.0


class PacsClient:
    """One PACS of the ``pacs`` config section.

    Args:
        name: its key in the config, used in messages.
        config: where it is and how to sign in.

    Usage::

        pacs = PacsClient("main", config.pacs["main"])
        files = pacs.retrieve_series(study_uid, series_uid, upload_folder, budget)
        pacs.store([seg, sr])
    """

    def __init__(self, name: str, config: PacsConfig):
        self.name, self.config = name, config
        self.session = requests.Session()
        if config.username is not None:
            self.session.auth = (config.username, config.password.get_secret_value())
        elif config.bearer_token is not None:
            self.session.headers["Authorization"] = f"Bearer {config.bearer_token.get_secret_value()}"
        self.web = DICOMwebClient(url=config.url, session=self.session, timeout=config.timeout_s)
        self.web.set_http_retry_params(retry=False)  # one retry policy, ours: see store()

    def retrieve_series(
        self, study_instance_uid: str, series_instance_uid: str, folder: Path, budget: UploadBudget
    ) -> int:
        """Write every instance of the series (WADO-RS, as stored) into ``folder`` as Part-10 files; return
        how many. The caller deletes ``folder`` if this raises: a retrieval cut half-way leaves nothing.

        Raises ``NotFoundAtPacs`` (404) for a series the PACS does not have, ``PacsFailed`` (502/503) when
        the PACS fails, cannot be reached or stops half-way, ``PayloadTooLarge`` (413) over ``budget``.
        """
        # Fetched with dicomweb-client's session but parsed here: dicomweb-client takes an answer cut short
        # for a whole one (a close-delimited answer ends the same either way; only the closing boundary
        # tells), and it decodes and re-encodes every instance where the bytes can go to disk as they come.
        url = f"{self.config.url.rstrip('/')}/studies/{study_instance_uid}/series/{series_instance_uid}"
        with self.translated("retrieving the series"):
            with self.session.get(url, headers=_AS_STORED, stream=True, timeout=self.config.timeout_s) as answer:
                answer.raise_for_status()
                boundary = multipart_related_boundary(answer.headers.get("content-type", ""))
                if not boundary:
                    raise MultipartParseError("the answer is not multipart/related of application/dicom")
                with DicomPartFiles(boundary, folder, budget) as parts:
                    for chunk in answer.iter_content(_CHUNK):
                        parts.write(chunk)
        if not parts.complete:
            raise PacsFailed(
                f"PACS {self.name} stopped sending the series half-way; nothing of it was kept",
                502,
                self.config.retry_after_s,
                transient=True,
            )
        if not parts.paths:
            raise NotFoundAtPacs(f"PACS {self.name} has no instances in that series")
        return len(parts.paths)

    def store(self, instances: Sequence[pydicom.Dataset]) -> int:
        """Store ``instances`` (STOW-RS), trying up to ``store_attempts`` times while the PACS is down or busy;
        return the attempts it took. Raises ``PacsFailed`` when the last attempt fails."""
        for attempt in range(1, self.config.store_attempts + 1):
            try:
                with self.translated("storing the results"):
                    self.web.store_instances(list(instances))
                return attempt
            except PacsFailed as failure:
                if attempt == self.config.store_attempts or not failure.transient:
                    status, retry_after_s = failure.args[1:3]
                    raise PacsFailed(f"{failure.reason} (attempt {attempt})", status, retry_after_s) from None
                time.sleep(_FIRST_PAUSE_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable: the loop returns or raises")

    @contextmanager
    def translated(self, doing: str) -> Iterator[None]:
        """The one place where what ``requests``, ``dicomweb-client`` and ``pydicom`` raise, calling this PACS,
        becomes ours: ``NotFoundAtPacs`` for a 404, else ``PacsFailed`` (``transient`` where trying again may work).
        ``doing`` ends each reason ("while retrieving the series"). Also what the WSI reader of a PACS's slides
        translates its calls with."""
        retry_after = self.config.retry_after_s
        try:
            yield
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            if status == 404:
                raise NotFoundAtPacs(f"PACS {self.name} has no such study or series (404 while {doing})") from None
            if status in (401, 403):
                raise PacsFailed(
                    f"PACS {self.name} refused medserve's credentials ({status} while {doing}); check the pacs config",
                    502,
                    retry_after,
                ) from None
            raise PacsFailed(
                f"PACS {self.name} answered {status} while {doing}",
                502,
                retry_after,
                transient=status in _TRANSIENT_STATUSES,
            ) from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError):
            raise PacsFailed(
                f"PACS {self.name} is unreachable, dropped the connection or did not answer within "
                f"{self.config.timeout_s:g} s while {doing}",
                503,
                retry_after,
                transient=True,
            ) from None
        except (requests.RequestException, MultipartParseError, InvalidDicomError, ValueError, EOFError):
            raise PacsFailed(
                f"PACS {self.name} sent an answer that is not DICOMweb while {doing}", 502, retry_after
            ) from None
