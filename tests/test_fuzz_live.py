"""Generated hostile studies sent to the live server.

Each answer must be the status that reading the study here predicts (a ``RequestError``'s 4xx, else 200),
in medserve's error format, and counted under that code in ``ray_medserve_requests_total`` — never as a
500; and a good study must still be served afterwards. The examples are drawn by the same strategies
as the readers' property-based tests (``study_strategies.py``), deterministically.
"""

import shutil
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import SEGMENT, ZIP, exported_total, requests_counted_by_code, settled, zip_files
from serve_app.errors import RequestError
from serve_app.studies.reader import read_study
from study_strategies import nifti_files, slice_changes, template_series, write_nifti, write_series

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

LIVE = settings(
    max_examples=8,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module", autouse=True)
def counts_settled(server_url):
    """Every response count settled once, before the first example: an earlier test's requests may still be on their
    way to the metrics agent (Ray exports every 2 s) and would be counted as an example's. After that each example
    waits for its own request's count before the next reads its ``before``."""
    settled(lambda: exported_total("ray_medserve_requests_total"))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return template_series(tmp_path_factory.mktemp("template"))


def _predicted_status(folder, limits) -> int:
    """What the server should answer for this upload folder, judged by reading it here."""
    scratch = folder.with_name(folder.name + "-read")
    shutil.copytree(folder, scratch)  # reading renames and unpacks inside the folder
    try:
        read_study(scratch, limits)
    except RequestError as e:
        return e.status_code
    finally:
        shutil.rmtree(scratch)
    return 200


def _send_and_check(client, app_config, folder, body: bytes, content_type: str) -> None:
    expected = _predicted_status(folder, app_config.limits)
    before, before_500 = requests_counted_by_code(expected, 500)
    response = client.post(SEGMENT, content=body, headers={"content-type": content_type})
    assert response.status_code == expected, response.text
    if expected != 200:
        error = response.json()["error"]
        assert error["status"] == expected and error["reason"]
    # Each scrape read for both codes at once: the count under the expected code must grow by exactly this request,
    # and the 500s not at all.
    deadline = time.monotonic() + 60
    while (counted := requests_counted_by_code(expected, 500))[0] < before + 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert counted == [before + 1, before_500]


@LIVE
@given(changes=slice_changes())
def test_generated_dicom_series_get_the_answer_reading_predicts(
    client, app_config, template, tmp_path_factory, changes
):
    folder = tmp_path_factory.mktemp("dicom")
    write_series(template, changes, folder)
    _send_and_check(client, app_config, folder, zip_files(sorted(folder.iterdir())), ZIP["content-type"])


@LIVE
@given(nifti=nifti_files(), gzipped=st.booleans())
def test_generated_nifti_images_get_the_predicted_answer(client, app_config, tmp_path_factory, nifti, gzipped):
    folder = tmp_path_factory.mktemp("nifti")
    path = folder / ("study.nii.gz" if gzipped else "study.nii")
    try:
        write_nifti(*nifti, path)
    except Exception:
        assume(False)  # nibabel will not write this header at all: nothing to send (counted by Hypothesis, not lost)
    _send_and_check(client, app_config, folder, path.read_bytes(), "application/octet-stream")


def test_a_good_study_is_still_served_after_the_generated_ones(client, phantom_series):
    response = client.post(SEGMENT, content=zip_files(phantom_series), headers=ZIP)
    assert response.status_code == 200, response.text
