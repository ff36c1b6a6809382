"""The medserve command against the running server, as a user types it."""

import http.server
import json
import os
import socket
import threading

import nibabel as nib
import numpy as np
import pytest

from helpers import dice, free_port, medserve


def test_sample_then_segment_writes_a_mask_matching_the_truth(server_url, tmp_path):
    sample = medserve("sample-ct", str(tmp_path / "study"), "--seed", "10003")
    assert sample.returncode == 0, sample.stderr
    out = tmp_path / "mask.nii.gz"
    result = medserve("segment", str(tmp_path / "study" / "series"), "--url", server_url, "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["labels"][0]["name"] == "organ"
    truth = nib.load(tmp_path / "study" / "truth.nii.gz")
    mask = nib.load(out)
    np.testing.assert_allclose(mask.affine, truth.affine, atol=1e-4)
    assert dice(np.asarray(mask.dataobj) == 1, np.asarray(truth.dataobj)) >= 0.9


def test_segment_reports_a_server_refusal_and_exits_2(server_url, tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a study")
    result = medserve("segment", str(bogus), "--url", server_url)
    assert result.returncode == 2
    assert "415" in result.stderr and "not a zip" in result.stderr


def test_bad_config_fails_naming_the_field(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("http: {port: 99999}\n")
    result = medserve("up", "--config", str(config))
    assert result.returncode == 2
    assert "http.port" in result.stderr


@pytest.mark.parametrize("command", ["reload", "down"])
def test_a_dead_cluster_that_ray_still_names_is_found_dead_within_seconds(command, tmp_path):
    # Ray's current-cluster file names a GCS that is gone (its processes killed): nothing listens on its port.
    ray_temp_dir = tmp_path / "ray-tmp"
    (ray_temp_dir / "ray").mkdir(parents=True)
    (ray_temp_dir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    config = tmp_path / "site.yaml"
    config.write_text(f"storage: {{root: {tmp_path / 'storage'}}}\n")
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_TMPDIR": str(ray_temp_dir)}
    arguments = ["--keep-ray"] if command == "down" else []
    result = medserve(command, "--config", str(config), *arguments, env=environment, timeout=90)
    assert "does not answer" in result.stderr and "ray_current_cluster" in result.stderr, result.stderr
    assert "no Ray cluster is running" in result.stderr
    assert result.returncode == (0 if command == "down" else 2)


def test_segment_with_no_server_says_so_in_one_line_and_exits_2(tmp_path):
    study = tmp_path / "study.dcm"
    study.write_bytes(b"not read: the server is not there")
    url = f"http://127.0.0.1:{free_port()}"
    result = medserve("segment", str(study), "--url", url, "--model", "any")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"medserve: cannot reach {url}: is the server running? (medserve up)"]


def test_segment_against_a_server_that_never_answers_times_out_in_one_line(tmp_path):
    study = tmp_path / "study.dcm"
    study.write_bytes(b"x" * 1000)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = medserve("segment", str(study), "--url", url, "--model", "any", "--timeout", "1")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"medserve: {url} did not answer within 1 s (--timeout sets how long to wait)"
    ]


@pytest.fixture
def other_server(request) -> str:
    """host:port of a web server on loopback that is not medserve: every GET gets the (status, page) parametrized."""
    status, page = getattr(request, "param", (404, b"<html>Not Found</html>"))

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"127.0.0.1:{server.server_address[1]}"
        server.shutdown()


@pytest.mark.parametrize("other_server", [(502, b"<html>\n  <body>Bad Gateway</body>\n</html>\n")], indirect=True)
def test_a_refusal_that_is_not_json_is_still_one_line(other_server, tmp_path):
    result = medserve("segment", str(tmp_path), "--url", f"http://{other_server}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["medserve: 502: <html> <body>Bad Gateway</body> </html>"]


@pytest.mark.parametrize("other_server", [(200, b"<html>\n  <body>Welcome</body>\n</html>\n")], indirect=True)
def test_a_server_that_is_not_medserve_is_named_in_one_line(other_server, tmp_path):
    result = medserve("segment", str(tmp_path), "--url", f"http://{other_server}")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"medserve: http://{other_server}/v1/models answered 200 but not with JSON: is --url a medserve server?"
    ]


def test_tls_to_a_plain_http_server_fails_in_one_line(other_server, tmp_path):
    result = medserve("segment", str(tmp_path), "--url", f"https://{other_server}")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"medserve: TLS with https://{other_server} failed: ")


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "http://127.0.0.1:port"])
def test_a_bad_server_url_is_one_line(url, tmp_path):
    result = medserve("segment", str(tmp_path), "--url", url)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("medserve: bad server URL (--url or $MEDSERVE_URL): ")
