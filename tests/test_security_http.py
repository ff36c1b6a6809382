"""The HTTP face of the security review, against the live test servers: hostile bodies cost nothing before they
are refused (read bytes, temporary disk and memory measured at the server's processes), a Host the server does not
answer for is refused, and every answer carries the web headers; /docs and the viewer work in Chromium under the
Content-Security-Policy, with no request leaving the server's origin."""

import http.client
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import test_viewer_browser
from ray_nodes import replica_title
from test_viewer_browser import canvas_pixels, mask_coloured, open_viewer, wait_until

from helpers import MODEL, SEGMENT, ZIP, audit_lines, auth, zip_files

# The viewer tests' headless Chromium (a fixture of that module, used here by name).
browser = test_viewer_browser.browser

# The tenant whose uploads may be at most 80,000 bytes (tests/conftest.py), and the tile model of the WSI tests.
SMALL_BUDGET_TENANT = "rural-clinic"
TILE_MODEL = "he-tile-tumour"
MiB = 1024**2


def _raw_exchange(
    url: str,
    path: str,
    headers: dict[str, str],
    pieces: Iterable[bytes],
    *,
    chunked: bool = False,
    pause_s: float = 0.0,
    wait_s: float = 60,
) -> tuple[int, bytes, int]:
    """POST ``pieces`` to ``url`` + ``path`` on a raw connection, one piece at a time (as chunks with ``chunked``),
    stopping as soon as an answer arrives; ``pause_s`` between pieces to give the server time to answer. Return the
    answer's status and body, and how many body bytes had been sent when it came: the server cannot have read more.
    """
    parts = urlsplit(url)
    connection = socket.create_connection((parts.hostname, parts.port), timeout=wait_s)
    try:
        lines = [f"POST {parts.path}{path} HTTP/1.1", f"Host: {parts.netloc}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines += ["Transfer-Encoding: chunked"] if chunked else []
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = 0
        for piece in pieces:
            if select.select([connection], [], [], pause_s)[0]:
                break
            try:
                connection.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
            except (BrokenPipeError, ConnectionResetError):  # the server answered and closed
                break
            sent += len(piece)
        else:
            if chunked:
                connection.sendall(b"0\r\n\r\n")
        answered = select.select([connection], [], [], wait_s)[0]
        assert answered, f"no answer within {wait_s} s of sending {sent} body bytes"
        response = http.client.HTTPResponse(connection)
        response.begin()
        return response.status, response.read(), sent
    finally:
        connection.close()


def _our_replicas(app: str, deployment: str = "") -> list[psutil.Process]:
    """The Serve replica processes of ``app`` (of one deployment, if given) in this test session's Ray cluster: its
    raylet is a child of this process, and its workers the raylet's (another session's cluster may run beside)."""
    title = replica_title(app, deployment)
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if " ".join(process.cmdline()).startswith(title):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    assert found, f"no process titled {title}*"
    return found


class Sampler:
    """Calls ``measure()`` every few milliseconds in a thread while the ``with`` block runs; ``peak`` is the
    largest value it returned."""

    def __init__(self, measure: Callable[[], int]):
        self.measure, self.peak = measure, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.measure())
            time.sleep(0.005)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.measure())


def _temporary_disk(uploads: Path, processes: list[psutil.Process]) -> int:
    """Bytes in the uploads folder, and in files the processes hold open that have no name any more (Starlette's
    spooled temporary files, or any other anonymous temporary file)."""
    total = 0
    for path in uploads.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # deleted as it was listed
            continue
    for process in processes:
        try:
            descriptors = os.listdir(f"/proc/{process.pid}/fd")
        except (FileNotFoundError, PermissionError):
            continue
        for fd in descriptors:
            try:
                target = os.readlink(f"/proc/{process.pid}/fd/{fd}")
                info = os.stat(f"/proc/{process.pid}/fd/{fd}")
            except OSError:
                continue
            if target.endswith(" (deleted)") and stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def _claiming_zip(entries: int) -> bytes:
    """A ZIP64 archive whose central directory lists one empty stored entry, named "a", ``entries`` times (47 bytes
    each): what zipfile would make an object of, entry by entry, had its end record not been read first."""
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
    entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    directory = entry * entries
    end64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, len(directory), len(local))
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(local) + len(directory), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return local + directory + end64 + locator + end


def test_an_unauthenticated_wsi_job_is_refused_before_its_body_is_read(tenant_url):
    # 1 MiB declared, sent 4 KiB at a time with a pause between: the 401 must come before 64 KiB are sent. Before,
    # FastAPI read and parsed the whole body (the job was a body parameter) before the key was looked at.
    pieces = [b" " * 4096] * 16
    status, body, sent = _raw_exchange(
        tenant_url,
        "/v1/wsi/jobs",
        {"Content-Type": "application/json", "Content-Length": str(MiB)},
        pieces,
        pause_s=0.2,
        wait_s=30,
    )
    assert status == 401, body
    assert b"API key is required" in body
    assert sent <= 64 * 1024
    print(f"unauthenticated WSI job: 401 with {sent} of {MiB} body bytes sent")


def _wsi_submits_audited(config, line_wanted: tuple, timeout_s: float = 10) -> set[tuple]:
    """(tenant, status, model) of every wsi-submit audit line of the application of ``config``, once
    ``line_wanted`` is among them (or ``timeout_s`` has passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = audit_lines(config)
        seen = {(line["tenant"], line["status"], line["model"]) for line in lines if line["route"] == "wsi-submit"}
        if line_wanted in seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def test_a_wsi_job_body_is_read_after_authentication_capped_and_its_model_authorised(
    client, app_config, tenant_url, tenant_keys, tenant_config
):
    import httpx

    # On the open server: the tenant application's WSI tests count the refusals its audit log holds.
    too_long = client.post(
        "/v1/wsi/jobs",
        content=b'{"model": "%s", "slides": ["%s"]}' % (TILE_MODEL.encode(), b"x" * MiB),
        headers={"content-type": "application/json"},
    )
    assert too_long.status_code == 413, too_long.text
    assert "at most 65536 bytes" in too_long.json()["error"]["reason"]
    unknown = client.post("/v1/wsi/jobs", json={"model": "no-such-model", "slides": ["a.tiff"]})
    assert unknown.status_code == 404, unknown.text
    # A model that does not exist is never echoed.
    assert ("anonymous", 404, None) in _wsi_submits_audited(app_config, ("anonymous", 404, None))
    # research-lab may use mr-brain only: 403, audited with the model it named (it exists).
    with httpx.Client(base_url=tenant_url, timeout=60) as api:
        body = {"model": TILE_MODEL, "slides": ["a.tiff"]}
        refused = api.post("/v1/wsi/jobs", json=body, headers=auth(tenant_keys["research-lab"]))
    assert refused.status_code == 403, refused.text
    assert ("research-lab", 403, TILE_MODEL) in _wsi_submits_audited(tenant_config, ("research-lab", 403, TILE_MODEL))


def test_a_chunked_multipart_upload_is_refused_at_the_budget_with_little_temporary_disk(
    tenant_url, tenant_keys, tenant_config
):
    # 50 MiB in one file part, chunked (no Content-Length to refuse it by), against an 80,000-byte budget. Before,
    # Starlette spooled every part to temporary files before the budget saw a byte of it.
    ingresses = _our_replicas(tenant_config.name, "Ingress")
    boundary = "securityboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.dcm"\r\n'
        "Content-Type: application/dicom\r\n\r\n"
    ).encode()

    def body():
        yield head
        for _ in range(50 * 16):
            yield bytes(64 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {**auth(tenant_keys[SMALL_BUDGET_TENANT]), "Content-Type": f"multipart/form-data; boundary={boundary}"}
    with Sampler(lambda: _temporary_disk(tenant_config.storage.uploads, ingresses)) as disk:
        status, answer, sent = _raw_exchange(tenant_url, SEGMENT, headers, body(), chunked=True)
    assert status == 413, answer
    assert b"over this server's limit of 80000 bytes" in answer
    assert disk.peak <= 2 * MiB, f"{disk.peak} bytes of temporary disk for an 80,000-byte budget"
    print(f"chunked multipart: {sent} bytes sent before the 413, temporary disk at most {disk.peak} bytes")


def test_a_zip_claiming_a_million_entries_is_refused_before_its_directory_is_parsed(client, app_config):
    # 47 MB, under the test server's 48 MiB upload limit: a ZIP64 directory of 10**6 entries. Before, zipfile built
    # an object of each (hundreds of MB in the replica that reads studies) before the entry count was checked.
    warm_up = client.post(SEGMENT, content=_claiming_zip(app_config.limits.max_files_per_upload + 1), headers=ZIP)
    assert warm_up.status_code == 413, warm_up.text
    replicas = _our_replicas(app_config.name)
    baseline = {process.pid: process.memory_info().rss for process in replicas}
    peaks = dict.fromkeys(baseline, 0)

    def growth() -> int:
        for process in replicas:
            try:
                peaks[process.pid] = max(peaks[process.pid], process.memory_info().rss - baseline[process.pid])
            except psutil.NoSuchProcess:
                continue
        return max(peaks.values())

    bomb = _claiming_zip(10**6)
    with Sampler(growth):
        response = client.post(SEGMENT, content=bomb, headers=ZIP)
    title = replica_title(app_config.name, "")
    grown = {" ".join(p.cmdline()).strip().removeprefix(title): peaks[p.pid] // 1024 for p in replicas}
    assert response.status_code == 413, response.text
    assert f"more than {app_config.limits.max_files_per_upload} files" in response.json()["error"]["reason"]
    # The replicas that read studies (Preprocess, or FusedPipeline): the ingress only spools the body, through
    # Serve's buffers, whatever it holds (a few MiB for these 47 MB, more or less from one run to the next).
    readers = {name: kib for name, kib in grown.items() if name != "Ingress"}
    assert max(readers.values()) < 10 * 1024, f"replicas' memory grew (KiB): {grown}"
    print(f"zip claiming 10**6 entries ({len(bomb)} bytes): replicas' memory growth (KiB) {grown}")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.2", "[::2]:80"])
def test_a_host_the_server_does_not_answer_for_is_refused(client, host):
    response = client.get("/v1/models", headers={"host": host})
    assert response.status_code == 400, response.text
    assert "http.allowed_hosts" in response.json()["error"]["reason"]
    assert response.headers["content-security-policy"]
    upload = client.post(SEGMENT, content=b"PK\x03\x04" + bytes(1000), headers={**ZIP, "host": host})
    assert upload.status_code == 400, upload.text


def test_hosts_the_server_answers_for_are_served_and_health_answers_any(client, server_url, tenant_url, tenant_keys):
    import httpx

    port = urlsplit(server_url).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert client.get("/v1/models", headers={"host": host}).status_code == 200, host
    for path in ("/healthz", "/readyz"):
        assert client.get(path, headers={"host": "10.1.2.3:8000"}).status_code == 200, path
    with httpx.Client(base_url=tenant_url, timeout=60) as api:
        key = auth(tenant_keys["st-marys"])
        assert api.get("/v1/models", headers={**key, "host": "evil.example"}).status_code == 400
        assert api.get("/v1/models", headers={**key, "host": "localhost"}).status_code == 200


SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def _assert_web_headers(response, *, cacheable: bool = False) -> None:
    csp = response.headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, (response.url, csp)
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (response.url, name)
    if cacheable:
        assert response.headers.get("cache-control") != "no-store", response.url
    else:
        assert response.headers.get("cache-control") == "no-store", response.url


def test_every_answer_carries_the_web_headers_and_patient_data_is_never_cached(client, phantom_series):
    segmented = client.post(SEGMENT, params={"keep_image": "true"}, content=zip_files(phantom_series), headers=ZIP)
    assert segmented.status_code == 200, segmented.text
    _assert_web_headers(segmented)
    result = segmented.json()
    for url in (result["mask_url"], result["seg_url"], result["sr_url"], f"/v1/results/{result['result_id']}"):
        response = client.get(url)
        assert response.status_code == 200, (url, response.text)
        _assert_web_headers(response)
    image = client.get(f"/v1/results/{result['result_id']}/image")
    assert image.status_code == 200
    _assert_web_headers(image)
    for path in ("/v1/models", f"/v1/models/{MODEL}", "/v1/reviews", "/v1/wsi/jobs", "/openapi.json", "/docs"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        _assert_web_headers(response)
    for path in ("/v1/results/" + "0" * 32, "/no-such-route"):
        _assert_web_headers(client.get(path))  # errors too
    for path in ("/viewer/", "/viewer/viewer.js", "/docs/assets/docs.js", "/docs/assets/swagger-ui/swagger-ui.css"):
        response = client.get(path)
        assert response.status_code == 200, path
        _assert_web_headers(response, cacheable=True)


def test_docs_is_served_from_the_servers_own_files(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http" not in page.text and "<script>" not in page.text  # no other origin, no inline script
    for asset in ("docs/assets/swagger-ui/swagger-ui-bundle.js", "docs/assets/swagger-ui/favicon-32x32.png"):
        assert asset in page.text
        assert client.get(f"/{asset}").status_code == 200
    assert client.get("/redoc").status_code == 404


# Installed before any script of a page runs: every Content-Security-Policy violation the page meets, kept.
_WATCH_CSP = (
    "window.cspViolations = [];"
    "document.addEventListener('securitypolicyviolation',"
    " (e) => window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));"
)


def _watch_csp(browser) -> None:
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _WATCH_CSP})


def _other_origins(browser, base_url: str) -> list[str]:
    """Resources the page loaded from anywhere but ``base_url``'s origin."""
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(base_url))
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    return [url for url in loaded if not url.startswith((origin, "data:", "blob:"))]


@pytest.mark.slow
def test_docs_renders_the_api_in_a_browser_under_the_csp_with_nothing_from_elsewhere(browser, tenant_url):
    _watch_csp(browser)
    browser.get(f"{tenant_url}/docs")
    wait_until(browser, "document.querySelectorAll('.opblock').length > 10", timeout_s=60)
    text = browser.execute_script("return document.body.innerText")
    assert "/v1/wsi/jobs" in text and "/v1/models/{name}/segment" in text
    # The WSI job's body is documented, though FastAPI no longer reads it: its schema shows once the route is opened.
    browser.execute_script(
        "[...document.querySelectorAll('.opblock-post')]"
        ".find((op) => op.querySelector('.opblock-summary-path').innerText.trim() === '/v1/wsi/jobs')"
        ".querySelector('.opblock-summary-control').click()"
    )
    wait_until(browser, "document.body.innerText.includes('slides')", timeout_s=30)
    assert browser.execute_script("return window.cspViolations") == []
    assert _other_origins(browser, tenant_url) == []


@pytest.mark.slow
def test_the_viewer_draws_a_result_under_the_csp(browser, server_url, client, phantom_series):
    assert "default-src 'self'" in client.get("/viewer/").headers.get("content-security-policy", "")
    result = client.post(SEGMENT, params={"keep_image": "true"}, content=zip_files(phantom_series), headers=ZIP)
    assert result.status_code == 200, result.text
    _watch_csp(browser)
    open_viewer(browser, server_url)
    wait_until(browser, "document.getElementById('model').options.length > 0", timeout_s=60)
    browser.find_element("id", "result-id").send_keys(result.json()["result_id"])
    browser.find_element("id", "open").click()
    wait_until(browser, "document.body.dataset.overlay === 'shown'")
    time.sleep(2)  # the first frames drawn by SwiftShader
    assert len(mask_coloured(canvas_pixels(browser))) > 500
    assert browser.execute_script("return window.cspViolations") == []
    assert _other_origins(browser, server_url) == []
