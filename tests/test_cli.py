"""The medserve command against the running server, as a user types it."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np

from conftest import dice


def medserve(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve_app.cli", *args], capture_output=True, text=True, timeout=600, **kwargs)


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
