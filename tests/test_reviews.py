"""Reviews kept with their results, the study's image kept for the viewer, and the viewer's vendored files:
no Ray (the live routes are in test_viewer_api.py, the page in test_viewer_browser.py)."""

import csv
import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydantic import ValidationError

from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.errors import ImageNotKept, ResultNotFound
from serve_app.model_repository import ModelRepository
from serve_app.results import ResultStore
from serve_app.results.reviews import MAX_COMMENT_CHARS, ReviewRequest, ReviewStore, reviews_csv
from serve_app.studies.volume import Volume
from serve_app.viewer import VIEWER_FILES

ROOT = Path(__file__).parent.parent
RESULT_ID = "0123456789abcdef0123456789abcdef"
OTHER_RESULT_ID = "fedcba9876543210fedcba9876543210"
KEPT_RESULT_ID = "00112233445566778899aabbccddeeff"


def saved_result(store: ResultStore, result_id: str, tenant: str, image: Path | None = None) -> None:
    spec = next(iter(ModelRepository(EMBEDDED_MODEL_REPOSITORY)))
    store.save(result_id, np.ones((2, 2, 2), np.uint8), (0, 0, 0), (2, 2, 2), np.eye(4), {"labels": []}, spec)
    store.commit(result_id, tenant, image)


@pytest.fixture
def store(tmp_path) -> ResultStore:
    store = ResultStore(tmp_path, retention_hours=1)
    saved_result(store, RESULT_ID, "st-marys")
    saved_result(store, OTHER_RESULT_ID, "city-general")
    return store


def test_a_review_is_kept_with_its_result_and_listed_for_its_tenant_only(store):
    reviews = ReviewStore(store)
    spec = store.model_of(RESULT_ID, "st-marys")
    first = reviews.add(RESULT_ID, "st-marys", ReviewRequest(verdict="accept", reviewer=" Dr Grey ", comment="fine"))
    second = reviews.add(RESULT_ID, "st-marys", ReviewRequest(verdict="comment", reviewer="Dr Yang", comment="hm"))
    reviews.add(OTHER_RESULT_ID, "city-general", ReviewRequest(verdict="reject", reviewer="Dr Bailey"))

    assert (first.model, first.model_version, first.tenant, first.reviewer) == (
        spec.name,
        spec.version,
        "st-marys",
        "Dr Grey",
    )
    assert reviews.of_result(RESULT_ID, "st-marys") == [first, second]
    assert reviews.of_tenant("st-marys") == [first, second]
    assert reviews.of_tenant("st-marys", model=spec.name, version=spec.version) == [first, second]
    assert reviews.of_tenant("st-marys", model="another-model") == []
    assert reviews.of_tenant("st-marys", model=spec.name, version="0.0.0") == []
    assert [r.verdict for r in reviews.of_tenant("city-general")] == ["reject"]
    # Another tenant's result is not found, for reading and for reviewing.
    with pytest.raises(ResultNotFound):
        reviews.of_result(RESULT_ID, "city-general")
    with pytest.raises(ResultNotFound):
        reviews.add(RESULT_ID, "city-general", ReviewRequest(verdict="accept", reviewer="Dr Bailey"))
    with pytest.raises(ResultNotFound):
        reviews.add("0" * 32, "st-marys", ReviewRequest(verdict="accept", reviewer="Dr Grey"))


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"verdict": "maybe", "reviewer": "Dr Grey"}, "verdict"),
        ({"verdict": "accept", "reviewer": "Dr Grey", "comment": "x" * (MAX_COMMENT_CHARS + 1)}, "comment"),
        ({"verdict": "comment", "reviewer": "Dr Grey"}, "needs a comment"),
        ({"verdict": "accept", "reviewer": ""}, "reviewer"),
        ({"verdict": "accept", "reviewer": "Dr\nGrey"}, "reviewer"),
        ({"verdict": "accept", "reviewer": "x" * 101}, "reviewer"),
        ({"verdict": "accept", "reviewer": "Dr Grey", "tenant": "city-general"}, "tenant"),
    ],
)
def test_a_bad_review_is_refused_naming_what_is_wrong(body, problem):
    with pytest.raises(ValidationError, match=problem):
        ReviewRequest.model_validate(body)


def test_a_comment_of_the_limit_is_taken():
    assert len(ReviewRequest(verdict="reject", reviewer="a", comment="x" * MAX_COMMENT_CHARS).comment) == 2000


def test_reviews_export_as_csv_without_formulas(store):
    reviews = ReviewStore(store)
    reviews.add(RESULT_ID, "st-marys", ReviewRequest(verdict="accept", reviewer="=HYPERLINK(1)", comment='a, "b"\nc'))
    rows = list(csv.DictReader(io.StringIO(reviews_csv(reviews.of_tenant("st-marys")))))
    assert len(rows) == 1
    assert rows[0]["reviewer"] == "'=HYPERLINK(1)"  # a spreadsheet shows it, does not run it
    assert rows[0]["comment"] == 'a, "b"\nc'
    assert rows[0]["verdict"] == "accept" and rows[0]["result_id"] == RESULT_ID
    assert list(rows[0]) == ["review_id", "result_id", "model", "model_version", "tenant", "reviewer", "verdict",
                             "comment", "created_at"]  # fmt: skip


def test_the_image_is_kept_on_the_masks_grid_as_int16_when_whole(store, tmp_path):
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = [10, 20, 30]
    hu = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 10 - 1000
    Volume(hu, affine).save_nifti(tmp_path / "image.nii.gz")
    assert not store.has_image(RESULT_ID, "st-marys")
    with pytest.raises(ImageNotKept, match="keep_image=true"):
        store.image_path(RESULT_ID, "st-marys")

    saved_result(store, KEPT_RESULT_ID, "st-marys", tmp_path / "image.nii.gz")
    assert not (tmp_path / "image.nii.gz").exists()  # moved, not copied
    kept = nib.load(store.image_path(KEPT_RESULT_ID, "st-marys"))
    assert kept.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(kept.dataobj), hu)
    np.testing.assert_allclose(kept.affine, affine)
    with pytest.raises(ResultNotFound):  # not another tenant's to see
        store.image_path(KEPT_RESULT_ID, "city-general")

    fractional = hu + 0.5
    Volume(fractional, affine).save_nifti(tmp_path / "mr.nii.gz")
    assert nib.load(tmp_path / "mr.nii.gz").get_data_dtype() == np.float32


def test_the_vendored_niivue_is_the_pinned_release_with_its_licence():
    pinned = re.search(r"^NIIVUE_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    bundle = VIEWER_FILES / "niivue" / "niivue.js"
    first_line = bundle.open().readline()
    assert first_line.startswith(f"/* @niivue/niivue {pinned}, dist/index.js from npm (BSD-2-Clause")
    assert "BSD 2-Clause License" in (VIEWER_FILES / "niivue" / "LICENSE").read_text()
    assert "sourceMappingURL" not in bundle.read_text()[-2000:]
    # Only the bundle and its licence: no source maps, type declarations or the rest of the npm package.
    assert sorted(p.name for p in (VIEWER_FILES / "niivue").iterdir()) == ["LICENSE", "niivue.js"]


def test_the_wheel_ships_the_viewer_and_niivue(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp_path, ROOT],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("medserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("index.html", "viewer.js", "viewer.css", "niivue/niivue.js", "niivue/LICENSE"):
        assert f"serve_app/viewer/static/{name}" in names
