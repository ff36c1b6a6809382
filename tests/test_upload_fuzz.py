"""Property-based tests of the upload layer: whatever the shape of an upload (parts x archives x sizes x
names), spooling and unpacking end in sorted files or a ``RequestError``, and never write more than one
request's budget of bytes or files.

Examples per test: ``MEDSERVE_FUZZ_PROFILE=ci`` (the default, deterministic) or ``fuzz`` (``make fuzz``).
"""

import io
import os
import struct
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from helpers import free_port
from serve_app.config import LimitsConfig
from serve_app.errors import PayloadTooLarge, RequestError, UnsupportedMediaType
from serve_app.studies.upload import UploadBudget, sort_upload, spool_request

# Generated names repeat: a zip with two entries of one name is a case worth sending, not a warning.
pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")

settings.register_profile(
    "ci", max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "fuzz", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("MEDSERVE_FUZZ_PROFILE", "ci"))

MAX_BYTES = 64 * 1024
MAX_FILES = 12
LIMITS = LimitsConfig(max_upload_bytes=MAX_BYTES, max_files_per_upload=MAX_FILES)

entry_names = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30),
    st.sampled_from(["../evil.dcm", "/etc/passwd", "C:\\x.dcm", "a/../../b", "dir/", "DOE^JOHN.dcm", "ok.dcm"]),
)
entry_sizes = st.one_of(st.integers(0, 2048), st.integers(MAX_BYTES // 4, MAX_BYTES * 2))


@st.composite
def archives(draw) -> bytes:
    """A zip archive, stored or deflated: generated names, sizes and contents (zeros, which deflate to almost
    nothing)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))) as zf:
        for name, size in draw(st.lists(st.tuples(entry_names, entry_sizes), max_size=16)):
            zf.writestr(zipfile.ZipInfo(name), bytes(size))
    data = buffer.getvalue()
    return data[: draw(st.integers(1, len(data)))] if draw(st.booleans()) and len(data) > 22 else data  # maybe cut


parts = st.lists(st.one_of(archives(), st.binary(max_size=4096), entry_sizes.map(bytes)), min_size=1, max_size=16)


def _disk_usage(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def _sort(folder: Path) -> None:
    try:
        sort_upload(folder, LIMITS)
    except RequestError:
        pass


@given(parts=parts)
def test_unpacking_never_exceeds_the_request_budget(tmp_path_factory, parts):
    folder = tmp_path_factory.mktemp("upload")
    for n, data in enumerate(parts):
        (folder / f"{n:06d}").write_bytes(data)
    spooled_bytes, _ = _disk_usage(folder)
    _sort(folder)
    written, files = _disk_usage(folder)
    # What archives unpacked fits in what the spooled parts left of the budget (unless they alone broke it).
    assert written - spooled_bytes <= max(MAX_BYTES - spooled_bytes, 0)
    assert files <= max(MAX_FILES, len(parts))


def _multipart(parts: list[bytes], boundary: str = "fuzzboundary") -> bytes:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{n}.bin"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for n, data in enumerate(parts)
    )
    return body + f"--{boundary}--\r\n".encode()


class SpoolServer:
    """``spool_request`` behind a real uvicorn on loopback, as the ingress runs it: each example's body reaches it as
    an HTTP client sends it (chunked, in the pieces the socket delivers), not as a hand-built ASGI request. One
    example at a time: ``post`` names the folder the next body is spooled to."""

    def __init__(self):
        self.folder: Path | None = None
        api = Starlette(routes=[Route("/", self._spool, methods=["POST"])])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def _spool(self, request: Request) -> Response:
        try:
            await spool_request(request, self.folder, UploadBudget.of(LIMITS))
        except RequestError as e:
            return Response(status_code=e.status_code)
        return Response(status_code=200)

    def post(self, folder: Path, body: bytes, content_type: str) -> int:
        self.folder = folder

        def pieces():  # no Content-Length: sent chunked, so only counting as it streams can bound it
            yield from (body[i : i + 1000] for i in range(0, len(body), 1000))

        return httpx.post(
            f"http://127.0.0.1:{self.port}/", content=pieces(), headers={"content-type": content_type}, timeout=60
        ).status_code


@pytest.fixture(scope="module")
def spool_server():
    server = SpoolServer()
    server.thread.start()
    while not server.server.started:
        time.sleep(0.05)
    yield server
    server.server.should_exit = True
    server.thread.join(timeout=10)


@given(parts=parts, multipart=st.booleans())
def test_spooling_then_unpacking_never_exceeds_the_request_budget(tmp_path_factory, spool_server, parts, multipart):
    folder = tmp_path_factory.mktemp("spool")
    if multipart:
        status = spool_server.post(folder, _multipart(parts), "multipart/form-data; boundary=fuzzboundary")
    else:
        status = spool_server.post(folder, parts[0], "application/zip")
    assert status == 200 or 400 <= status < 500, status  # spooled, or refused with a reason: never a 500
    spooled, spooled_files = _disk_usage(folder)
    assert spooled <= MAX_BYTES and spooled_files <= MAX_FILES
    _sort(folder)
    written, files = _disk_usage(folder)
    assert written <= MAX_BYTES and files <= MAX_FILES


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_a_long_archive_opens_in_parallel_runs_to_the_same_files_in_order(tmp_path, compression):
    # 70 entries: four runs of threads (16 entries a run at least); each entry's bytes tell it apart. Stored
    # entries are read where they lie in the archive, deflated ones unpacked through zipfile.
    entries = [b"\0" * 128 + b"DICM" + n.to_bytes(4, "little") * (100 + n) for n in range(70)]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression) as zf:
        for n, data in enumerate(entries):
            zf.writestr(f"slice-{n}.dcm", data)
    (tmp_path / "000000").write_bytes(archive.getvalue())
    contents = sort_upload(tmp_path, LimitsConfig())
    assert [file.read_bytes() for file in contents.dicom] == entries


def test_a_stored_entry_changed_after_zipping_fails_its_crc_and_nothing_is_unpacked(tmp_path):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.dcm", b"\0" * 128 + b"DICM" + bytes(1000))
    changed = bytearray(archive.getvalue())
    changed[changed.index(b"DICM") + 500] ^= 0xFF  # the directory's CRC-32 no longer matches
    (tmp_path / "000000").write_bytes(changed)
    with pytest.raises(UnsupportedMediaType, match="corrupt or truncated"):
        sort_upload(tmp_path, LimitsConfig())
    assert not list((tmp_path / "000000.unzipped").iterdir())


def _listing_zip(listed: int, claimed: int, zip64: bool, name: bytes = b"") -> bytes:
    """One empty stored entry, its central directory entry (named ``name``) repeated ``listed`` times; the end
    record (ZIP64 with ``zip64``) claims ``claimed`` entries."""
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
    entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0)
    directory = (entry + name) * listed
    if not zip64:
        end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, claimed, claimed, len(directory), len(local), 0)
        return local + directory + end
    end64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, claimed, claimed, len(directory), len(local))
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(local) + len(directory), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return local + directory + end64 + locator + end


@pytest.mark.parametrize(
    "archive, reason",
    [
        pytest.param(_listing_zip(1, 10**6, zip64=True), "more than 12 files", id="ZIP64 record claims 10**6"),
        pytest.param(_listing_zip(1, 13, zip64=False), "more than 12 files", id="end record claims one too many"),
        pytest.param(_listing_zip(40, 1, zip64=False), "more than 12 files", id="directory holds more than claimed"),
        pytest.param(_listing_zip(1, 1, zip64=True, name=b"n" * 20_000), "directory is over", id="long directory"),
    ],
)
def test_an_archive_over_the_file_budget_is_refused_from_its_end_records_before_zipfile_reads_it(
    tmp_path, monkeypatch, archive, reason
):
    def never(*args, **kwargs):
        raise AssertionError("zipfile parsed the central directory")

    monkeypatch.setattr(zipfile, "ZipFile", never)
    (tmp_path / "000000").write_bytes(archive)
    with pytest.raises(PayloadTooLarge, match=reason):
        sort_upload(tmp_path, LIMITS)


def test_archives_within_the_budget_still_open_zip64_and_commented_ones_included(tmp_path):
    dicom = b"\0" * 128 + b"DICM" + bytes(100)
    for n, (zip64, comment) in enumerate([(True, b""), (False, b"an archive comment")]):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", allowZip64=True) as zf:
            for k in range(3):
                with zf.open(f"{k}.dcm", "w", force_zip64=zip64) as entry:
                    entry.write(dicom)
            zf.comment = comment
        folder = tmp_path / str(n)
        folder.mkdir()
        (folder / "000000").write_bytes(buffer.getvalue())
        assert len(sort_upload(folder, LIMITS).dicom) == 3
