"""Patient data at rest, on real files and a real server: private files and folders, storage roots that are
medserve's own, retention that runs on a timer, tenants kept apart on disk, one job per `out`, upload quotas, PACS
listed per tenant, and no file name in a log."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest

from deployments.replica import Replica
from helpers import wait_for_job
from serve_app.config import AppConfig, ConfigError, StorageConfig, load_config
from serve_app.model_repository import ModelRepository
from serve_app.results import SUMMARY_FILE, ResultStore
from serve_app.results.reviews import ReviewRequest, ReviewStore
from serve_app.retention import RetentionSweeper
from serve_app.samples.synthetic_slides import write_slide
from serve_app.storage import UnsafeStorage, secure_storage
from serve_app.tenancy.audit import AuditLog
from serve_app.tenancy.keys import hash_api_key, new_api_key
from serve_app.wsi.job_status import JobRecords, WsiJobStatus
from serve_app.wsi.jobs import WsiJobs
from serve_app.wsi.readers import tifffile_reader as slide_module
from serve_app.wsi.retention import sweep_wsi
from serve_app.wsi.slides import InvalidSlide, open_slide

RESULT_ID = "0123456789abcdef0123456789abcdef"
TILE_MODEL = "he-tile-tumour"
JOBS = "/v1/wsi/jobs"
DAY_S = 86400


def tenant(**more) -> dict:
    return {
        "name": "A Hospital",
        "api_key_hashes": [hash_api_key(new_api_key())],
        "models": ["*"],
        "rate": {"per_second": 1, "burst": 1},
        "max_concurrent": 1,
        **more,
    }


def config_of(tmp_path: Path, **overrides) -> AppConfig:
    return load_config(overrides={"storage.root": str(tmp_path / "storage"), **overrides})


def save_result(store: ResultStore, tenant_id: str = "st-marys") -> Path:
    store.save(RESULT_ID, np.ones((2, 2, 2), np.uint8), (0, 0, 0), (2, 2, 2), np.eye(4), {"labels": []})
    store.commit(RESULT_ID, tenant_id)
    return store.root / RESULT_ID


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


# --- storage folders: medserve's own, created private --------------------------------------------------------------


@pytest.mark.parametrize("threat", ["owned by nobody", "mode 0777"])
def test_a_storage_root_of_another_user_or_writable_by_others_is_refused_at_start(tmp_path, threat):
    root = tmp_path / "storage"
    root.mkdir(mode=0o700)
    if threat == "owned by nobody":
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(root, 65534, 65534)
        found = "owned by nobody"
    else:
        root.chmod(0o777)
        found = "writable by group or others (mode 0777)"
    with pytest.raises(UnsafeStorage) as refused:
        ResultStore.of(StorageConfig(root=root))
    message = str(refused.value)
    assert f"storage folder {root} " in message and found in message and "chmod 700" in message
    with pytest.raises(UnsafeStorage, match=found.replace("(", r"\(").replace(")", r"\)")):
        secure_storage(config_of(tmp_path))


def test_each_storage_folder_is_checked_and_created_private(tmp_path):
    config = config_of(
        tmp_path, **{"audit.directory": str(tmp_path / "audit"), "wsi.output_root": str(tmp_path / "wsi")}
    )
    created = secure_storage(config)
    assert {tmp_path / "storage", tmp_path / "audit", tmp_path / "wsi"} <= set(created)
    assert all(private(folder) for folder in created)
    (tmp_path / "wsi").chmod(0o770)  # group-writable: refused where the WSI jobs start
    with pytest.raises(UnsafeStorage, match=f"storage folder {tmp_path / 'wsi'} "):
        WsiJobs(config, ModelRepository(config.model_repository), {})
    (tmp_path / "audit").chmod(0o757)
    with pytest.raises(UnsafeStorage, match=f"storage folder {tmp_path / 'audit'} "):
        AuditLog(config.audit, config.storage.root, "replica")


def test_a_replica_writes_with_a_private_umask_even_without_calling_its_base(tmp_path):
    class Deployment(Replica):
        def __init__(self, folder: Path):  # no super().__init__(): the umask is set all the same
            (folder / "result.json").write_text("{}")
            (folder / "results").mkdir()

    before = os.umask(0o022)
    try:
        replica = Deployment.__new__(Deployment)  # as Serve makes a replica: __new__, then __init__
        replica.__init__(tmp_path)
        assert os.umask(0o022) == 0o077
    finally:
        os.umask(before)
    assert private(tmp_path / "result.json") and private(tmp_path / "results")


def test_job_records_and_the_audit_salt_are_written_private_whatever_the_umask(tmp_path):
    before = os.umask(0o022)
    try:
        records = JobRecords(tmp_path / "jobs")
        records.save(_job_status("a" * 32, tmp_path / "out"))
        salt_folder = tmp_path / "audit"
        salt_folder.mkdir(mode=0o700)
        AuditLog(load_config().audit, tmp_path, "replica")
    finally:
        os.umask(before)
    assert private(records.path("a" * 32)) and private(tmp_path / "audit" / "salt")
    assert [p.name for p in (tmp_path / "jobs").iterdir()] == ["a" * 32 + ".json"]  # no partial file left


# --- retention on a timer, judged by when a result was made --------------------------------------------------------


def test_an_expired_result_is_deleted_by_the_timer_without_a_save(tmp_path):
    config = config_of(tmp_path, **{"storage.result_retention_hours": 1 / 3600, "storage.sweep_interval_s": 0.2})
    store = ResultStore.of(config.storage)
    folder = save_result(store)
    sweeper = RetentionSweeper(config).start()
    try:
        deadline = time.monotonic() + 10
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sweeper.stop()
    assert not folder.exists()


def test_a_reviewed_result_expires_when_it_was_made_plus_the_retention(tmp_path):
    store = ResultStore(tmp_path / "results", retention_hours=1)
    folder = save_result(store)
    ReviewStore(store).add(RESULT_ID, "st-marys", ReviewRequest(reviewer="dr. a", verdict="accept", comment=""))
    summary = folder / SUMMARY_FILE
    made = {**json.loads(summary.read_text()), "created": (datetime.now(UTC) - timedelta(hours=2)).isoformat()}
    summary.write_text(json.dumps(made))
    two_hours_ago = time.time() - 7200
    os.utime(summary, (two_hours_ago, two_hours_ago))
    assert folder.stat().st_mtime > time.time() - 60  # the review just touched its folder
    store.sweep()
    assert not folder.exists()


def test_wsi_uploads_and_ended_jobs_are_deleted_after_the_retention_days(tmp_path):
    config = config_of(tmp_path, **{"wsi.retention_days": 30})
    wsi = config.wsi
    uploads = wsi.uploads("anonymous")
    uploads.mkdir(parents=True)
    old_slide, new_slide, stale_partial = uploads / "old.tiff", uploads / "new.tiff", uploads / ".x.tiff.partial"
    for path in (old_slide, new_slide, stale_partial):
        path.write_bytes(b"slide")
    _age(old_slide, 31 * DAY_S)
    _age(stale_partial, 2 * 3600)
    records = JobRecords(wsi.jobs)
    old_out, resumed_out = wsi.tenant_folder("anonymous") / "old", wsi.tenant_folder("anonymous") / "resumed"
    old_job = _job_status("1" * 32, old_out, finished_days_ago=31)
    first_run = _job_status("2" * 32, resumed_out, finished_days_ago=40)
    resumed_run = _job_status("3" * 32, resumed_out, finished_days_ago=1)  # keeps the out folder both wrote
    for status in (old_job, first_run, resumed_run):
        Path(status.out_path, "slide-1").mkdir(parents=True, exist_ok=True)
        records.save(status)

    sweep_wsi(wsi)
    assert not old_slide.exists() and not stale_partial.exists() and new_slide.exists()
    assert not old_out.exists() and not records.path(old_job.job_id).exists()
    assert resumed_out.exists() and records.path(first_run.job_id).exists()

    sweep_wsi(wsi, now=time.time() + 30 * DAY_S)
    assert not resumed_out.exists() and list(wsi.jobs.glob("*.json")) == []


def test_a_dead_ingress_upload_folder_is_swept_after_an_hour(tmp_path):
    config = config_of(tmp_path)
    orphan, live = config.storage.uploads / ("a" * 32), config.storage.uploads / ("b" * 32)
    for folder in (orphan, live):
        folder.mkdir(parents=True)
        (folder / "study.zip").write_bytes(b"PK")
    _age(orphan, 2 * 3600)
    RetentionSweeper(config).sweep()
    assert not orphan.exists() and (live / "study.zip").exists()


# --- configuration: tenants apart on disk, reserved ids, PACS per tenant -------------------------------------------


def test_slide_roots_that_overlap_storage_or_another_tenant_are_refused_at_load(tmp_path):
    storage = tmp_path / "storage"
    cases = {
        "inside the outputs": ({"a": [storage / "wsi" / "a" / "uploads"]}, "overlaps wsi.output_root"),
        "holding the storage": ({"a": [tmp_path]}, r"overlaps (wsi|storage)\."),
        "another tenant's": (
            {"a": [tmp_path / "slides"], "b": [tmp_path / "slides" / "b"]},
            "tenants.b.wsi_slide_roots",
        ),
    }
    for roots, names in cases.values():
        tenants = {tenant_id: tenant(wsi_slide_roots=[str(r) for r in paths]) for tenant_id, paths in roots.items()}
        with pytest.raises(ConfigError, match=f"tenants.a.wsi_slide_roots: .* {names}"):
            config_of(tmp_path, tenants=tenants)
    with pytest.raises(ConfigError, match="wsi.slide_roots: .* overlaps wsi.output_root"):
        config_of(tmp_path, **{"wsi.slide_roots": [str(storage)]})  # an open server's roots too
    apart = {"a": tenant(wsi_slide_roots=[str(tmp_path / "a")]), "b": tenant(wsi_slide_roots=[str(tmp_path / "b")])}
    assert config_of(tmp_path, tenants=apart).tenants["b"].wsi_slide_roots == [tmp_path / "b"]


def test_the_global_slide_roots_are_for_an_open_server_only(tmp_path):
    with pytest.raises(ConfigError, match=r"wsi.slide_roots .* move each folder to tenants.<id>.wsi_slide_roots"):
        config_of(tmp_path, tenants={"a": tenant()}, **{"wsi.slide_roots": [str(tmp_path / "slides")]})


@pytest.mark.parametrize("reserved", ["jobs", "anonymous", "uploads", "state", "results"])
def test_reserved_tenant_ids_are_refused(tmp_path, reserved):
    with pytest.raises(ConfigError, match=f"tenants.{reserved}.*tenant id '{reserved}' is reserved"):
        config_of(tmp_path, tenants={reserved: tenant()})


def test_with_tenants_a_pacs_must_list_its_tenants(tmp_path):
    pacs = {"url": "http://pacs.example.org/dicom-web"}
    with pytest.raises(ConfigError, match=r"pacs.main.tenants is not set, but tenants are configured.*\[\"\*\"\]"):
        config_of(tmp_path, tenants={"a": tenant()}, pacs={"main": pacs})
    shared = config_of(tmp_path, tenants={"a": tenant(), "b": tenant()}, pacs={"main": {**pacs, "tenants": ["*"]}})
    assert shared.pacs["main"].allows("a") and shared.pacs["main"].allows("b")
    own = config_of(tmp_path, tenants={"a": tenant(), "b": tenant()}, pacs={"main": {**pacs, "tenants": ["a"]}})
    assert own.pacs["main"].allows("a") and not own.pacs["main"].allows("b")
    assert config_of(tmp_path, pacs={"main": pacs}).pacs["main"].allows("anonymous")  # an open server, as before


# --- logs ----------------------------------------------------------------------------------------------------------


def test_a_slide_the_library_cannot_read_is_logged_without_its_name(tmp_path, monkeypatch, caplog):
    path = tmp_path / "Doe^John-1902-03-04.tiff"
    path.write_bytes(b"II*\x00")

    def failing_read(name, *args, **kwargs):  # a library's message that names the file (tifffile's may)
        raise ValueError(f"{name}: the IFD chain cannot be read")

    monkeypatch.setattr(slide_module.tifffile, "TiffFile", failing_read)
    with caplog.at_level(logging.DEBUG), pytest.raises(InvalidSlide) as refused:
        open_slide(path)
    assert "ValueError" in caplog.text and "Doe^John" not in caplog.text and "Doe^John" not in str(refused.value)


# --- live: the test cluster --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slide(slide_root: Path) -> Path:
    folder = slide_root / "security"
    folder.mkdir(exist_ok=True)
    path = folder / "case.tiff"
    write_slide(path, 2400, 1800, seed=5, tumour_fraction=0.5)
    return path


def test_every_file_medserve_writes_is_private(client, app_config, phantom_series, slide):
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in phantom_series]
    segmented = client.post("/v1/models/ct-phantom-organ/segment", files=files)
    assert segmented.status_code == 200, segmented.text
    assert client.get(f"/v1/results/{segmented.json()['result_id']}/seg.dcm").status_code == 200
    job = client.post(JOBS, json={"model": TILE_MODEL, "slides": [str(slide)], "out": "private"})
    assert job.status_code == 202, job.text
    assert wait_for_job(client, job.json()["job_id"])["state"] == "done"
    written = list(app_config.storage.root.rglob("*"))
    assert any(p.name == "summary.json" for p in written) and any(p.name == "seg.dcm" for p in written)
    shared = [f"{p.relative_to(app_config.storage.root)} {stat.S_IMODE(p.stat().st_mode):04o}" for p in written]
    assert [line for line, p in zip(shared, written, strict=True) if not private(p)] == []


def test_concurrent_submits_into_one_out_give_one_202_and_one_409(client, slide):
    for attempt in range(3):
        body = {"model": TILE_MODEL, "slides": [str(slide)], "out": f"race-{attempt}"}
        start = threading.Barrier(2)
        answers: list[httpx.Response] = []

        def submit(body=body, start=start, answers=answers):
            start.wait()
            answers.append(client.post(JOBS, json=body))

        threads = [threading.Thread(target=submit) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(a.status_code for a in answers) == [202, 409], [a.text for a in answers]
        accepted = next(a for a in answers if a.status_code == 202).json()["job_id"]
        assert "race-" in next(a for a in answers if a.status_code == 409).json()["error"]["reason"]
        client.delete(f"{JOBS}/{accepted}")
        wait_for_job(client, accepted)


def _tenant_client(tenant_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=tenant_url, headers={"authorization": f"Bearer {key}"}, timeout=120)


def test_a_tenant_cannot_name_another_tenants_slides_or_uploads(tenant_url, tenant_keys, tenant_config, slide):
    # The intruder is city-general: no test gives it a running job (whose limit would answer 429 first), and a
    # refused submit leaves no record. path-lab owns the slides; its own job shows that they can be read.
    owner_root = tenant_config.tenants["path-lab"].wsi_slide_roots[0]
    theirs = owner_root / "their-case.tiff"
    theirs.write_bytes(slide.read_bytes())
    with (
        _tenant_client(tenant_url, tenant_keys["city-general"]) as intruder,
        _tenant_client(tenant_url, tenant_keys["path-lab"]) as owner,
    ):
        uploaded = owner.post("/v1/wsi/slides", params={"name": "upload.tiff"}, content=slide.read_bytes())
        assert uploaded.status_code == 201, uploaded.text
        for path in (str(theirs), uploaded.json()["slide"]):
            refused = intruder.post(JOBS, json={"model": TILE_MODEL, "slides": [path]})
            assert refused.status_code == 403, refused.text
        own = owner.post(JOBS, json={"model": TILE_MODEL, "slides": [str(theirs), uploaded.json()["slide"]]})
        assert own.status_code == 202, own.text
        assert [s["state"] for s in own.json()["slides"]] == ["queued", "queued"]
        owner.delete(f"{JOBS}/{own.json()['job_id']}")
        wait_for_job(owner, own.json()["job_id"])


def test_a_wsi_upload_past_the_tenants_quota_gets_413(tenant_url, tenant_keys, tenant_config):
    quota = tenant_config.tenants["rural-clinic"].wsi_upload_quota_bytes
    with _tenant_client(tenant_url, tenant_keys["rural-clinic"]) as rural:
        first = rural.post("/v1/wsi/slides", params={"name": "a.tiff"}, content=b"s" * (quota // 2 + 1))
        assert first.status_code == 201, first.text
        declared = rural.post("/v1/wsi/slides", params={"name": "b.tiff"}, content=b"s" * (quota // 2 + 1))
        assert declared.status_code == 413 and "quota" in declared.json()["error"]["reason"], declared.text

        def chunked():  # no Content-Length: refused while it streams
            for _ in range(quota // 1024 + 1):
                yield b"s" * 1024

        streamed = rural.post("/v1/wsi/slides", params={"name": "c.tiff"}, content=chunked())
        assert streamed.status_code == 413, streamed.text
    kept = [p for p in tenant_config.wsi.uploads("rural-clinic").iterdir() if not p.name.endswith(".partial")]
    assert len(kept) == 1


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _job_status(job_id: str, out: Path, finished_days_ago: float | None = None) -> WsiJobStatus:
    finished = datetime.now(UTC) - timedelta(days=finished_days_ago) if finished_days_ago is not None else None
    return WsiJobStatus(
        job_id=job_id,
        tenant="anonymous",
        model=TILE_MODEL,
        model_version="1.0.0",
        state="done" if finished else "queued",
        out=out.name,
        out_path=str(out),
        created=(finished or datetime.now(UTC)) - timedelta(minutes=5),
        finished=finished,
        slides=[],
    )
