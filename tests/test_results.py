import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from serve_app.errors import NoDicomResult, ResultNotFound
from serve_app.results import SUMMARY_FILE, ResultStore

RESULT_ID = "0123456789abcdef0123456789abcdef"


def save_result(store: ResultStore) -> None:
    """A small all-ones result saved (staged) under RESULT_ID."""
    store.save(RESULT_ID, np.ones((2, 2, 2), np.uint8), (0, 0, 0), (2, 2, 2), np.eye(4), {"labels": []})


def made_two_hours_ago(folder: Path) -> None:
    """The result in ``folder`` as if it had been made two hours ago: its summary's creation time."""
    summary_path = folder / SUMMARY_FILE
    summary = json.loads(summary_path.read_text())
    summary["created"] = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    summary_path.write_text(json.dumps(summary))


def test_saved_result_reads_back_until_it_expires(tmp_path):
    store = ResultStore(tmp_path, retention_hours=1)
    save_result(store)
    store.commit(RESULT_ID, "st-marys")
    assert store.mask_path(RESULT_ID, "st-marys").is_file()
    assert store.summary(RESULT_ID, "st-marys") == {"labels": []}

    made_two_hours_ago(store.root / RESULT_ID)
    with pytest.raises(ResultNotFound, match="expired"):
        store.mask_path(RESULT_ID, "st-marys")
    store.sweep()
    assert not (store.root / RESULT_ID).exists()


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "ABC", "0123456789abcdef0123456789abcdeg", ""])
def test_result_ids_cannot_name_other_paths(tmp_path, bad_id):
    with pytest.raises(ResultNotFound):
        ResultStore(tmp_path, retention_hours=1).mask_path(bad_id, "st-marys")


def test_a_result_is_not_found_by_another_tenant(tmp_path):
    store = ResultStore(tmp_path, retention_hours=1)
    save_result(store)
    with pytest.raises(ResultNotFound):
        store.summary(RESULT_ID, "st-marys")  # no owner recorded yet: nobody's
    store.commit(RESULT_ID, "st-marys")
    with pytest.raises(ResultNotFound):
        store.summary(RESULT_ID, "city-general")
    assert store.summary(RESULT_ID, "st-marys") == {"labels": []}


def test_the_mask_is_rebuilt_on_the_whole_grid_from_its_box(tmp_path):
    store = ResultStore(tmp_path, retention_hours=1)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = [200.0, 180.0, -90.0]
    box = np.zeros((3, 4, 5), np.uint8)
    box[1:, 1:3, 2:] = 1
    store.save(RESULT_ID, box, (10, 20, 30), (40, 50, 60), affine, {"labels": []})
    store.commit(RESULT_ID, "st-marys")

    path = store.mask_path(RESULT_ID, "st-marys")
    built = path.stat().st_mtime_ns
    mask = nib.load(path)
    expected = np.zeros((40, 50, 60), np.uint8)
    expected[10:13, 20:24, 30:35] = box
    assert np.array_equal(np.asanyarray(mask.dataobj), expected)
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, affine)
    assert store.mask_path(RESULT_ID, "st-marys").stat().st_mtime_ns == built  # built once, then served


def test_a_result_without_dicom_source_has_no_seg_or_sr(tmp_path):
    store = ResultStore(tmp_path, retention_hours=1)
    save_result(store)
    store.commit(RESULT_ID, "st-marys")
    assert not store.has_dicom_results(RESULT_ID, "st-marys")
    with pytest.raises(NoDicomResult, match="download mask.nii.gz"):
        store.seg_path(RESULT_ID, "st-marys")
    with pytest.raises(ResultNotFound):  # another tenant learns nothing, not even that the study was NIfTI
        store.has_dicom_results(RESULT_ID, "city-general")


def test_a_saved_result_is_nobodys_until_its_request_commits_it(tmp_path):
    store = ResultStore(tmp_path, retention_hours=1)
    save_result(store)
    assert [p.name for p in tmp_path.iterdir()] == [f"{RESULT_ID}.staged"]
    with pytest.raises(ResultNotFound):
        store.summary(RESULT_ID, "st-marys")
    store.commit(RESULT_ID, "st-marys")
    assert [p.name for p in tmp_path.iterdir()] == [RESULT_ID]
    assert store.summary(RESULT_ID, "st-marys") == {"labels": []}


def test_a_result_its_request_gave_up_on_is_deleted_or_never_stored(tmp_path):
    store = ResultStore(tmp_path, retention_hours=1)
    save_result(store)
    store.discard(RESULT_ID)  # the deadline passed after the stage had stored it
    assert not (tmp_path / f"{RESULT_ID}.staged").exists()

    late = ResultStore(tmp_path / "late", retention_hours=1)
    late.discard(RESULT_ID)  # the deadline passed while a stage, not interruptible, was still making it
    save_result(late)
    assert [p.name for p in late.root.iterdir()] == [f"{RESULT_ID}.discarded"]


def test_a_request_cancelled_while_its_result_is_made_discards_it(tmp_path):
    store = ResultStore(tmp_path, retention_hours=1)
    with pytest.raises(TimeoutError), store.discarded_if_cancelled(RESULT_ID):
        save_result(store)
        raise TimeoutError
    assert [p.name for p in tmp_path.iterdir()] == [f"{RESULT_ID}.discarded"]


def test_a_request_that_failed_otherwise_leaves_nothing(tmp_path):
    store = ResultStore(tmp_path, retention_hours=1)
    with pytest.raises(ValueError), store.discarded_if_cancelled(RESULT_ID):
        raise ValueError("the study was refused before any stage ran")
    assert list(tmp_path.iterdir()) == []


def test_the_sweep_deletes_what_abandoned_results_left_once_they_are_old(tmp_path):
    store = ResultStore(tmp_path, retention_hours=1)
    save_result(store)  # staged, its request never came back: its ingress replica died
    store.discard("fedcba9876543210fedcba9876543210")
    store.sweep()
    assert len(list(tmp_path.iterdir())) == 2  # either might still be committed or written

    eleven_minutes_ago = time.time() - 660
    for path in tmp_path.iterdir():
        os.utime(path, (eleven_minutes_ago, eleven_minutes_ago))
    store.sweep()
    assert list(tmp_path.iterdir()) == []
