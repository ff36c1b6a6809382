"""Every way a PACS can fail a call, as medserve words it: ``PacsClient.translated`` is the one translation of what
``requests``, ``dicomweb-client`` and ``pydicom`` raise, for a series retrieved (``NotFoundAtPacs``, ``PacsFailed``)
and for a slide read from the PACS (the same reasons, as the slide's ``InvalidSlide``). The PACS is a real HTTP server
on loopback that answers every request with one status and body, or nothing listening on a port."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import free_port
from serve_app.config.pacs import PacsConfig
from serve_app.dicomweb.pacs_client import PacsClient
from serve_app.errors import InvalidSlide, NotFoundAtPacs, PacsFailed
from serve_app.studies.upload import UploadBudget
from serve_app.wsi.slides import DicomwebSlide, open_slide

STUDY, SERIES = "1.2.3", "1.2.3.4"


class _OneAnswer(BaseHTTPRequestHandler):
    """Answers every GET with the server's ``answer``: (status, body)."""

    def do_GET(self) -> None:
        status, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def pacs_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OneAnswer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _config(port: int) -> PacsConfig:
    return PacsConfig(url=f"http://127.0.0.1:{port}/dicom-web", timeout_s=5, store_attempts=1, retry_after_s=7)


# The PACS's answer (status, body) -> the error and its reason, "while {doing}" naming the call.
ANSWERS = {
    "404": ((404, b""), NotFoundAtPacs, "PACS main has no such study or series (404 while {doing})"),
    "401": (
        (401, b""),
        PacsFailed,
        "PACS main refused medserve's credentials (401 while {doing}); check the pacs config",
    ),
    "403": (
        (403, b""),
        PacsFailed,
        "PACS main refused medserve's credentials (403 while {doing}); check the pacs config",
    ),
    "503, transient": ((503, b""), PacsFailed, "PACS main answered 503 while {doing}"),
    "400, not transient": ((400, b""), PacsFailed, "PACS main answered 400 while {doing}"),
    "not DICOMweb": ((200, b"not json"), PacsFailed, "PACS main sent an answer that is not DICOMweb while {doing}"),
}
TRANSIENT = {"503, transient"}


@pytest.mark.parametrize("case", ANSWERS)
def test_the_pacs_client_translates_each_failure_of_a_retrieval(pacs_server, case, tmp_path):
    pacs_server.answer, error, reason = ANSWERS[case]
    pacs = PacsClient("main", _config(pacs_server.server_port))
    with pytest.raises(error) as raised:
        pacs.retrieve_series(STUDY, SERIES, tmp_path, UploadBudget(max_bytes=1 << 20, max_files=10))
    assert raised.value.reason == reason.format(doing="retrieving the series")
    if error is PacsFailed:
        assert raised.value.args[1:] == (502, 7, case in TRANSIENT)


def test_the_pacs_client_translates_a_pacs_that_cannot_be_reached(tmp_path):
    pacs = PacsClient("main", _config(free_port()))
    with pytest.raises(PacsFailed) as raised:
        pacs.retrieve_series(STUDY, SERIES, tmp_path, UploadBudget(max_bytes=1 << 20, max_files=10))
    assert raised.value.reason == (
        "PACS main is unreachable, dropped the connection or did not answer within 5 s while retrieving the series"
    )
    assert raised.value.args[1:] == (503, 7, True)


@pytest.mark.parametrize("case", ANSWERS)
def test_a_slide_on_the_pacs_fails_with_the_same_reason_and_says_when_to_submit_again(pacs_server, case):
    pacs_server.answer, _, reason = ANSWERS[case]
    with pytest.raises(InvalidSlide) as raised:
        open_slide(DicomwebSlide("main", _config(pacs_server.server_port), STUDY, SERIES))
    later = "; submit the job again later" if case in TRANSIENT else ""
    assert raised.value.reason == reason.format(doing="opening the series") + later  # never the URL's UIDs


def test_a_slide_on_a_pacs_that_cannot_be_reached_says_to_submit_the_job_again_later():
    with pytest.raises(InvalidSlide) as raised:
        open_slide(DicomwebSlide("main", _config(free_port()), STUDY, SERIES))
    assert raised.value.reason == (
        "PACS main is unreachable, dropped the connection or did not answer within 5 s while opening the series; "
        "submit the job again later"
    )
