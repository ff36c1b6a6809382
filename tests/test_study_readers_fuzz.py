"""Property-based tests of the study readers: DICOM series and NIfTI files built from generated header values
end, through ``read_study`` and the embedded model's preprocessing, in a finite model input or a
``RequestError`` (a 4xx) — never in another exception, which the server would answer with a 500.

Examples per test: ``MEDSERVE_FUZZ_PROFILE=ci`` (the default, deterministic) or ``fuzz`` (``make fuzz``).
"""

import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from serve_app.config import EMBEDDED_MODEL_REPOSITORY, LimitsConfig
from serve_app.errors import RequestError
from serve_app.model_repository import ModelRepository
from serve_app.segmentation.transforms import to_model_input
from serve_app.studies.reader import read_study
from study_strategies import nifti_files, slice_changes, template_series, write_nifti, write_series

# Generated headers make nibabel and numpy warn (divisions by zero spacing, and so on): the outcome is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

settings.register_profile(
    "ci", max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "fuzz", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("MEDSERVE_FUZZ_PROFILE", "ci"))

LIMITS = LimitsConfig(max_volume_voxels=64**3)
SPEC = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("ct-phantom-organ")


def _end(build) -> None:
    """Read what ``build`` wrote and preprocess it: a finite model input, or a RequestError."""
    try:
        volume = read_study(build, LIMITS)
        image = to_model_input(volume, SPEC.preprocessing, "cpu")
    except RequestError:
        return
    assert torch.isfinite(image.as_tensor()).all(), "preprocessing made a non-finite model input"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return template_series(tmp_path_factory.mktemp("template"))


@given(changes=slice_changes())
def test_generated_dicom_series_end_in_a_model_input_or_a_4xx(template, tmp_path_factory, changes):
    folder = tmp_path_factory.mktemp("dicom")
    write_series(template, changes, folder)
    try:
        _end(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@given(nifti=nifti_files(), gzipped=st.booleans())
def test_generated_nifti_images_end_in_a_model_input_or_a_4xx(tmp_path_factory, nifti, gzipped):
    folder = tmp_path_factory.mktemp("nifti")
    try:
        path = folder / ("study.nii.gz" if gzipped else "study.nii")
        try:
            write_nifti(*nifti, path)
        except Exception:
            assume(False)  # nibabel will not write this header at all
        _end(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
