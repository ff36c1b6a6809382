"""Input monitoring: the features of studies and slides, the population stability index, the model's reference and
its command, and the live metrics of studies sent to the shared test app (docs/monitoring.md)."""

from __future__ import annotations

import math
import shutil
import time

import numpy as np
import pydicom
import pytest
import yaml

from helpers import MODEL, SEGMENT, ZIP, exported_samples, settled, zip_files
from serve_app.cli import main
from serve_app.config import EMBEDDED_MODEL_REPOSITORY, load_config
from serve_app.model_repository import ModelRepository
from serve_app.observability.input_drift import (
    DRIFT_THRESHOLD,
    REFERENCE_FILE,
    InputMonitor,
    InputReference,
    build_reference,
    drift,
    population_stability_index,
)
from serve_app.observability.input_features import (
    STUDY_FEATURES,
    bucket,
    slide_features,
    stain_optical_densities,
    study_features,
    vendor,
)
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series, write_nifti
from serve_app.studies.dicom_series import read_dicom_series
from serve_app.studies.nifti import read_nifti
from serve_app.studies.volume import Volume
from serve_app.wsi.slides import open_slide
from serve_app.wsi.tissue import detect_tissue


def values(rng: np.random.Generator, n: int, shift: float = 0.0) -> list[dict]:
    return [{"x": float(v), "kind": "a" if v < 0.5 else "b"} for v in rng.normal(shift, 1.0, n)]


def test_the_same_distribution_scores_near_zero_and_a_shifted_one_over_the_threshold():
    rng = np.random.default_rng(0)
    reference = build_reference("m", "1", [{"x": v["x"]} for v in values(rng, 2000)])
    assert reference.features["x"].kind == "value" and len(reference.features["x"].bins) == 10
    same = drift(reference, [{"x": v["x"]} for v in values(rng, 200)])["x"]
    shifted = drift(reference, [{"x": v["x"]} for v in values(rng, 200, shift=1.0)])["x"]
    assert same.psi < 0.1
    assert shifted.psi > DRIFT_THRESHOLD
    assert math.isclose(sum(same.recent), 1.0) and math.isclose(sum(same.reference), 1.0)
    assert population_stability_index([5, 5, 5], [5, 5, 5]) == 0.0
    assert population_stability_index([10, 0], [0, 10]) > DRIFT_THRESHOLD  # empty bins: smoothed, finite


def test_a_category_the_reference_never_saw_gets_its_own_bin():
    reference = build_reference("m", "1", [{"manufacturer": "siemens"}] * 50)
    readings = drift(reference, [{"manufacturer": "siemens"}] * 40 + [{"manufacturer": "ge"}] * 10)
    assert readings["manufacturer"].bins == ["siemens", "ge"]
    assert readings["manufacturer"].recent == [0.8, 0.2] and readings["manufacturer"].reference == [1.0, 0.0]
    assert readings["manufacturer"].psi > DRIFT_THRESHOLD
    assert drift(reference, [{"manufacturer": "siemens"}] * 50)["manufacturer"].psi == 0.0


def test_the_monitor_keeps_a_window_and_reads_a_reference_written_while_it_runs(tmp_path):
    monitor = InputMonitor(window=20, export=False)
    assert monitor.observe("m", "1", tmp_path, {"x": 1.0}) == {}  # no reference: counted, no score
    rng = np.random.default_rng(1)
    build_reference("m", "1", [{"x": v["x"]} for v in values(rng, 500)]).save(tmp_path)
    for v in values(rng, 30, shift=2.0):
        readings = monitor.observe("m", "1", tmp_path, {"x": v["x"]})
    assert readings["x"].psi > DRIFT_THRESHOLD
    assert sum(readings["x"].recent) == pytest.approx(1.0)
    assert len(monitor._windows[("m", "1")]) == 20
    (tmp_path / REFERENCE_FILE).write_text("not json")  # a broken reference fails no request
    assert monitor.observe("m", "1", tmp_path, {"x": 0.0}) == {}


def test_vendors_and_buckets_are_a_fixed_set():
    assert vendor("GE MEDICAL SYSTEMS") == "ge"
    assert vendor("SIEMENS Healthineers") == "siemens"
    assert vendor("TOSHIBA") == "canon"
    assert vendor("Dr. Smith's own scanner") == "other"
    assert vendor("") == vendor(None) == "unknown"
    assert bucket(0.8, (1.0, 2.0)) == "0-1" and bucket(1.0, (1.0, 2.0)) == "0-1" and bucket(2.5, (1.0, 2.0)) == "2+"
    assert bucket(None, (1.0,)) == bucket(float("nan"), (1.0,)) == "unknown"


def test_study_features_of_a_dicom_series_and_a_nifti_image(tmp_path):
    phantom = ct_phantom(np.random.default_rng(10_002))
    paths = write_ct_series(phantom.volume, tmp_path / "series")
    features = study_features(read_dicom_series(paths, load_config().limits))
    assert list(features) == list(STUDY_FEATURES)
    assert features["modality"] == "CT" and features["manufacturer"] == "other"  # "medserve phantom"
    assert features["slice_thickness_mm"] == "3-5" and features["pixel_spacing_mm"] == "2+"
    # Inside the body (over -500 HU): fat, soft tissue, organs, bone; the air around it is left out.
    assert -150 < features["intensity_p05"] < features["intensity_p50"] < features["intensity_p95"] < 1000
    assert 0 < features["intensity_p50"] < 100

    write_nifti(phantom.volume.array, phantom.volume.affine, tmp_path / "study.nii.gz")
    nifti = study_features(read_nifti(tmp_path / "study.nii.gz", load_config().limits))
    assert nifti["modality"] == "unknown" and nifti["manufacturer"] == "unknown"
    assert nifti["slice_thickness_mm"] == "3-5"  # the grid's step where no header says

    # MR: the body is over a tenth of the 99th percentile; its background of zeros is left out.
    mr = np.zeros((40, 40, 10), np.float32)
    mr[10:30, 10:30] = np.linspace(400, 600, 10, dtype=np.float32)
    mr_features = study_features(Volume(array=mr, affine=np.diag([0.8, 0.8, 1.5, 1.0]), modality="MR"))
    assert 400 <= mr_features["intensity_p05"] <= mr_features["intensity_p95"] <= 600
    assert mr_features["pixel_spacing_mm"] == "0.7-0.9" and mr_features["slice_thickness_mm"] == "1-2"


def test_stain_statistics_of_a_generated_slide(tmp_path):
    """The mean H&E optical densities of a synthetic slide's tissue, from the level its tissue mask is made on: in the
    range of the embedded model's reference; a faded copy of the same pixels (half the light absorbed) has about half
    the densities."""
    from serve_app.samples.synthetic_slides import write_slide

    written = write_slide(tmp_path / "slide.tiff", 1500, 1100, seed=9)
    slide = open_slide(str(written.path))
    try:
        tissue = detect_tissue(slide)
        features = slide_features(slide.levels[0].mpp, tissue.stain_od)
    finally:
        slide.close()
    assert features["mpp"] == "0.3-0.6"
    hematoxylin, eosin = tissue.stain_od
    reference = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("he-tile-tumour")
    edges = InputReference.load(reference.folder).features["stain_od_hematoxylin"].edges
    assert 0.5 * edges[0] < hematoxylin < 2 * edges[-1] and eosin > 0

    rgb = np.full((64, 64, 3), 245, np.uint8)
    rgb[16:48, 16:48] = (120, 60, 150)  # haematoxylin-purple
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    dense = stain_optical_densities(rgb, mask)
    faded = stain_optical_densities((255 * np.sqrt(rgb / 255.0)).astype(np.uint8), mask)  # OD halved
    assert dense[0] > dense[1] > 0
    assert faded[0] == pytest.approx(dense[0] / 2, rel=0.1)
    assert stain_optical_densities(rgb, np.zeros((64, 64), bool)) is None


def test_the_embedded_models_ship_their_references():
    repository = ModelRepository(EMBEDDED_MODEL_REPOSITORY)
    for name, features in (
        ("ct-phantom-organ", set(STUDY_FEATURES)),
        ("he-tile-tumour", {"mpp", "stain_od_hematoxylin", "stain_od_eosin"}),
    ):
        spec = repository.get(name)
        reference = InputReference.load(spec.folder)
        assert reference is not None and (reference.model, reference.version) == (spec.name, spec.version)
        assert set(reference.features) == features
        assert all(sum(f.counts) == reference.inputs for f in reference.features.values())


def test_the_input_reference_command_writes_the_reference_beside_the_model(tmp_path, capsys):
    repository = tmp_path / "models"
    without_reference = shutil.ignore_patterns(REFERENCE_FILE)
    shutil.copytree(EMBEDDED_MODEL_REPOSITORY / MODEL, repository / MODEL, ignore=without_reference)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model_repository": str(repository)}))
    studies = []
    for seed in (10_003, 10_004):
        write_ct_series(ct_phantom(np.random.default_rng(seed)).volume, tmp_path / f"series-{seed}")
        studies.append(str(tmp_path / f"series-{seed}"))
    assert main(["input-reference", MODEL, *studies, "--config", str(config)]) == 0
    reference = InputReference.load(repository / MODEL)
    assert reference.inputs == 2 and reference.features["manufacturer"].bins == ["other"]
    assert main(["input-reference", MODEL, *studies, "--synthetic", "2", "--config", str(config)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["input-reference", "no-such-model", "--synthetic", "1", "--config", str(config)]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_studies_sent_to_the_live_app_are_counted_and_scored(server_url, client, phantom_series, tmp_path):
    """Through the shared test app: the phantom series as it is, then as a GE scanner's (its Manufacturer changed):
    both counted by manufacturer, and the new vendor raises the manufacturer's PSI against the embedded model's
    reference, whose inputs all came from 'other'."""
    ge_series = []
    for path in phantom_series:
        ds = pydicom.dcmread(path)
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(tmp_path / path.name)
        ge_series.append(tmp_path / path.name)
    version = client.get(f"/v1/models/{MODEL}").json()["version"]

    def counted(manufacturer: str) -> float:
        labels = {"model": MODEL, "version": version, "feature": "manufacturer", "value": manufacturer}
        return sum(v for tags, v in exported_samples("ray_medserve_inputs_total") if labels.items() <= tags.items())

    before = settled(lambda: (counted("other"), counted("ge")))
    for series in (phantom_series, ge_series):
        response = client.post(SEGMENT, content=zip_files(series), headers=ZIP)
        assert response.status_code == 200, response.text
    deadline = time.monotonic() + 30  # the replica exports its metrics every 2 s here
    while min(added := (counted("other") - before[0], counted("ge") - before[1])) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert added == (1, 1)

    mine = {"model": MODEL, "version": version}
    psi = {
        tags["feature"]: value
        for tags, value in exported_samples("ray_medserve_input_drift_psi")
        if mine.items() <= tags.items() and value > 0
    }
    assert set(psi) >= {"manufacturer"} and all(math.isfinite(v) for v in psi.values()), psi
    fractions = {
        (tags["bin"], tags["population"])
        for tags, value in exported_samples("ray_medserve_input_bin_fraction")
        if {**mine, "feature": "manufacturer"}.items() <= tags.items() and value > 0
    }
    assert {("ge", "recent"), ("other", "recent"), ("other", "reference")} <= fractions
    windows = exported_samples("ray_medserve_input_drift_window_inputs")
    window = [value for tags, value in windows if mine.items() <= tags.items()]
    assert window and max(window) >= 2
