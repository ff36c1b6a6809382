"""WSI jobs end to end on the test cluster: real pyramidal TIFFs, the real job driver actors, the tile model's
autoscaled Serve replicas, results on disk and over HTTP."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import tifffile
import zarr
from PIL import Image

from helpers import exported_total, medserve, settled, wait_for_job
from serve_app.samples.synthetic_slides import write_slide
from serve_app.wsi.jobs import driver_of
from serve_app.wsi.renderings import write_tiles_geojson

TILE_MODEL = "he-tile-tumour"
JOBS = "/v1/wsi/jobs"
_RESOLUTION = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}  # 0.5 microns per pixel


@pytest.fixture(scope="module")
def slides(slide_root: Path) -> dict[str, Path]:
    """Good and bad slides in the servers' slide root."""
    folder = slide_root / "jobs"
    folder.mkdir()
    paths = {name: folder / f"{name}.tiff" for name in ("tumour", "blank", "nompp", "corrupt", "truncated", "flat")}
    write_slide(paths["tumour"], 3000, 2200, seed=3, tumour_fraction=0.5)
    rng = np.random.default_rng(0)
    glass = rng.integers(236, 250, (1100, 1500, 3), dtype=np.uint8)  # one small level: no pyramid needed
    tifffile.imwrite(paths["blank"], glass, tile=(256, 256), compression="jpeg", photometric="rgb", **_RESOLUTION)
    pixels = tifffile.imread(paths["tumour"], level=0)
    tifffile.imwrite(paths["nompp"], pixels, tile=(256, 256), compression="jpeg", photometric="rgb")
    paths["corrupt"].write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    whole = paths["tumour"].read_bytes()
    paths["truncated"].write_bytes(whole[: len(whole) // 2])
    flat = np.tile(pixels[:1100, :1500], (4, 3, 1))  # 4400 x 4500, one level in strips: not tiles a job can read
    tifffile.imwrite(paths["flat"], flat, compression="jpeg", photometric="rgb", **_RESOLUTION)
    return paths


def _submit(client, slides: list, **more) -> dict:
    response = client.post(JOBS, json={"model": TILE_MODEL, "slides": [str(s) for s in slides], **more})
    assert response.status_code == 202, response.text
    return response.json()


def _output(job: dict, name: str, slide_index: int = 0) -> Path:
    return Path(job["out_path"]) / job["slides"][slide_index]["key"] / name


def _heatmap(job: dict, slide_index: int = 0) -> np.ndarray:
    return zarr.open_array(Path(job["out_path"]) / job["slides"][slide_index]["key"] / "heatmap.zarr", mode="r")[:]


def test_a_job_classifies_each_good_slide_and_fails_each_bad_one_alone(client, slides, tmp_path):
    names = ["tumour", "blank", "nompp", "corrupt", "truncated", "flat"]
    job = wait_for_job(client, _submit(client, [slides[n] for n in names] + ["/etc/hostname"])["job_id"])
    by_name = dict(zip([*names, "forbidden"], job["slides"], strict=True))
    assert job["state"] == "done"
    assert by_name["tumour"]["state"] == "done" and by_name["blank"]["state"] == "done"
    assert by_name["blank"]["summary"]["tiles_tissue"] == 0  # no tissue: a result with zero tiles
    expected_errors = {
        "nompp": "resolution",
        "corrupt": "TIFF",
        "truncated": "truncated",
        "flat": "pyramid",
        "forbidden": "outside",
    }
    for name, words in expected_errors.items():
        assert by_name[name]["state"] == "failed", (name, by_name[name])
        assert words.lower() in by_name[name]["error"].lower(), (name, by_name[name]["error"])

    summary = by_name["tumour"]["summary"]
    assert summary["tiles_tissue"] > 20 and summary["tiles_positive"] > 0
    assert job["tiles_done"] == job["tiles_total"] == summary["tiles_tissue"]
    heatmap = _heatmap(job)
    assert heatmap.shape == tuple(summary["grid"])
    assert int((~np.isnan(heatmap)).sum()) == summary["tiles_tissue"]
    attributes = zarr.open_array(Path(job["out_path"]) / by_name["tumour"]["key"] / "heatmap.zarr").attrs
    assert attributes["mpp"] == 0.5 and attributes["tile_size"] == 224 and attributes["level"] == 0

    # The heatmap follows the truth: tiles that are mostly tumour score higher than tiles that are mostly normal.
    truth = np.asarray(Image.open(slides["tumour"].with_name("tumour.truth.png")))
    rows, cols = heatmap.shape
    truth_tiles = np.asarray(Image.fromarray(truth).resize((cols, rows), Image.Resampling.NEAREST))
    tumour, normal = heatmap[truth_tiles == 2], heatmap[truth_tiles == 1]
    assert np.nanmean(tumour) > np.nanmean(normal) + 0.3, (np.nanmean(tumour), np.nanmean(normal))

    outputs = f"{JOBS}/{job['job_id']}/slides/0"
    geojson = client.get(f"{outputs}/tiles.geojson")
    assert geojson.status_code == 200 and geojson.headers["content-type"] == "application/geo+json"
    features = geojson.json()["features"]
    assert len(features) == summary["tiles_tissue"]
    # Made unit by unit as they came back, the file is the one the whole heatmap gives at once.
    write_tiles_geojson(tmp_path / "whole.geojson", heatmap, tile_extent_level0=attributes["tile_extent_level0"])
    assert geojson.content == (tmp_path / "whole.geojson").read_bytes()
    assert {f["properties"]["classification"]["name"] for f in features} <= {"Tumor", "Normal"}
    overlay = client.get(f"{outputs}/overlay.png")
    assert overlay.status_code == 200 and overlay.content.startswith(b"\x89PNG")
    written_summary = client.get(f"{outputs}/summary.json").json()
    assert written_summary["tiles_positive"] == summary["tiles_positive"]
    assert [level["index"] for level in written_summary["levels"]] == list(range(len(written_summary["levels"])))
    assert written_summary["levels"][0]["width"] == 3000 and written_summary["levels"][0]["mpp"] == 0.5
    assert client.get(f"{outputs}/tissue.png").status_code == 200
    assert client.get(f"{outputs}/secrets.txt").status_code == 404
    assert client.get(f"{JOBS}/{job['job_id']}/slides/2/overlay.png").status_code == 404  # failed: no output


def test_mpp_given_with_a_job_opens_a_slide_whose_file_has_no_resolution(client, slides):
    job = wait_for_job(client, _submit(client, [slides["nompp"]], mpp=0.5)["job_id"])
    assert job["state"] == "done" and job["slides"][0]["summary"]["tiles_tissue"] > 20


def test_slide_paths_outside_the_roots_or_with_dot_dot_are_refused(client, slides, slide_root, tmp_path):
    escape = slide_root / "escape.tiff"
    outside = tmp_path / "outside.tiff"
    outside.write_bytes(slides["tumour"].read_bytes())
    escape.symlink_to(outside)
    refusals = (
        ("/etc/passwd", 403),
        (str(escape), 403),
        ("escape.tiff", 403),  # relative to the root it links out of: not taken for a missing upload of that name
        (f"{slide_root}/jobs/../jobs/tumour.tiff", 400),
    )
    for path, status in refusals:
        response = client.post(JOBS, json={"model": TILE_MODEL, "slides": [path]})
        assert response.status_code == status, (path, response.text)
        assert "passwd" not in response.text
    assert client.post(JOBS, json={"model": TILE_MODEL, "slides": ["x"], "out": "../up"}).status_code == 422


def test_a_job_needs_a_tile_classifier_and_segmentation_needs_a_segmentation_model(client, slides):
    response = client.post(JOBS, json={"model": "ct-phantom-organ", "slides": [str(slides["tumour"])]})
    assert response.status_code == 422 and "tile_classification" in response.json()["error"]["reason"]
    response = client.post(f"/v1/models/{TILE_MODEL}/segment", content=b"x")
    assert response.status_code == 422 and "WSI job" in response.json()["error"]["reason"]
    assert client.get(f"{JOBS}/{'0' * 32}").status_code == 404
    assert client.get(f"{JOBS}/not-a-job").status_code == 404


def test_an_uploaded_slide_can_be_named_in_a_job(client, slides):
    body = slides["tumour"].read_bytes()
    upload = client.post("/v1/wsi/slides", params={"name": "case.svs"}, content=body)
    assert upload.status_code == 201, upload.text
    assert upload.json()["bytes"] == len(body)
    job = wait_for_job(client, _submit(client, [upload.json()["slide"]])["job_id"])
    assert job["state"] == "done" and job["slides"][0]["summary"]["tiles_tissue"] > 20
    assert client.post("/v1/wsi/slides", params={"name": "notes.txt"}, content=b"x").status_code == 400


def _tile_model_replicas(app: str = "medserve") -> int:
    from ray import serve

    deployment = serve.status().applications[app].deployments[f"TileModel:{TILE_MODEL}"]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def big_slide(slides) -> Path:
    path = slides["tumour"].with_name("big.tiff")
    write_slide(path, 7000, 5000, seed=5)
    return path


def test_the_tile_model_scales_up_with_a_backlog_and_back_down_when_it_drains(client, big_slide):
    """Recorded every half second: 0 replicas idle, 2 (the max) while the job's units queue, 0 again after."""
    # Idle first (an earlier test's job may have left replicas to scale down): the record starts at 0.
    deadline = time.monotonic() + 120
    while (idle := _tile_model_replicas()) != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    replicas_over_time = [idle]
    job_id = _submit(client, [big_slide], out="autoscaling")["job_id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        replicas_over_time.append(_tile_model_replicas())
        job = client.get(f"{JOBS}/{job_id}").json()
        if job["state"] not in ("queued", "running") and replicas_over_time[-1] == 0:
            break
        time.sleep(0.5)
    assert job["state"] == "done"
    assert replicas_over_time[0] == 0, replicas_over_time
    assert max(replicas_over_time) == 2, replicas_over_time
    assert replicas_over_time[-1] == 0, replicas_over_time


def test_a_killed_job_resumed_into_the_same_folder_redoes_nothing_finished_and_ends_identical(client, big_slide):
    reference = wait_for_job(client, _submit(client, [big_slide], out="uninterrupted")["job_id"])
    first = _submit(client, [big_slide], out="resumed")
    deadline = time.monotonic() + 120
    while (job := client.get(f"{JOBS}/{first['job_id']}").json())["tiles_done"] < 0.3 * max(job["tiles_total"], 1):
        assert time.monotonic() < deadline and job["state"] in ("queued", "running"), job
        time.sleep(0.2)
    # Kill the process of the job's driver (one of the pool, which Ray restarts knowing none of its jobs) and one of
    # the tile model's replicas (a worker process) mid-job.
    driver = driver_of(first["job_id"])
    ray.kill(driver, no_restart=False)
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if f"TileModel:{TILE_MODEL}" in a["name"])
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    interrupted = client.get(f"{JOBS}/{first['job_id']}").json()
    assert interrupted["state"] == "interrupted"
    assert ray.get(driver.job_ids.remote(), timeout=60) == []  # restarted, and runs no job

    classified_before = settled(lambda: exported_total("ray_medserve_wsi_tiles_total", model=TILE_MODEL))
    resumed = wait_for_job(client, _submit(client, [big_slide], out="resumed")["job_id"])
    summary = resumed["slides"][0]["summary"]
    assert resumed["state"] == "done"
    assert resumed["tiles_done"] == resumed["tiles_total"] == summary["tiles_tissue"]  # the head start counts
    assert 0 < summary["chunks_resumed"] < summary["chunks_total"], summary
    # Counted apart from the job's records: the tiles the resumed run had classified. At most those the killed run
    # had not recorded as done (its record may lag what it wrote, never lead it), so nothing finished was redone.
    classified_after = settled(lambda: exported_total("ray_medserve_wsi_tiles_total", model=TILE_MODEL))
    classified = classified_after - classified_before
    assert 0 < classified <= summary["tiles_tissue"] - interrupted["tiles_done"], (classified, interrupted)
    np.testing.assert_array_equal(_heatmap(resumed), _heatmap(reference))
    # The outputs, built up unit by unit (the resumed run's from the chunks it found finished and those it did), are
    # the uninterrupted run's to the byte.
    for name in ("tiles.geojson", "overlay.png", "tissue.png"):
        assert _output(resumed, name).read_bytes() == _output(reference, name).read_bytes(), name


def test_cancel_stops_a_job_and_the_cli_follows_one_to_its_end(server_url, client, big_slide, slides):
    job = _submit(client, [big_slide, slides["tumour"]], out="cancelled")
    cancel = client.delete(f"{JOBS}/{job['job_id']}")
    assert cancel.status_code == 200
    assert wait_for_job(client, job["job_id"])["state"] == "cancelled"

    env = {**os.environ, "MEDSERVE_URL": server_url}
    run = medserve("wsi", "submit", str(slides["tumour"]), "--model", TILE_MODEL, "--out", "cli", env=env)
    assert run.returncode == 0, run.stderr
    assert "tiles/s" in run.stderr and "1 slides done, 0 failed" in run.stderr
    listing = medserve("wsi", "list", env=env)
    assert listing.returncode == 0 and "cli" in listing.stdout and "cancelled" in listing.stdout
    job_id = next(line.split()[0] for line in listing.stdout.splitlines() if "out cli" in line)
    status = medserve("wsi", "status", job_id, env=env)
    assert status.returncode == 0 and "positive" in status.stderr
    missing = medserve("wsi", "status", "0" * 32, env=env)
    assert missing.returncode == 2 and "404" in missing.stderr


def test_tenancy_applies_to_wsi_jobs(tenant_url, tenant_keys, tenant_config, slides):
    import httpx

    def client_of(tenant: str | None) -> httpx.Client:
        headers = {"authorization": f"Bearer {tenant_keys[tenant]}"} if tenant else {}
        return httpx.Client(base_url=tenant_url, headers=headers, timeout=60)

    body = {"model": TILE_MODEL, "slides": [str(slides["tumour"])]}
    with client_of(None) as anonymous, client_of("rural-clinic") as rural, client_of("st-marys") as marys:
        assert anonymous.post(JOBS, json=body).status_code == 401
        assert rural.post(JOBS, json=body).status_code == 403  # may use ct-phantom-organ only
        # A slide on a PACS st-marys may not use (path-lab's and research-lab's) fails alone; the other runs.
        forbidden = {"pacs": "unanswered", "study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4"}
        first = marys.post(JOBS, json={**body, "slides": [*body["slides"], forbidden]})
        assert first.status_code == 202
        second = marys.post(JOBS, json=body)  # the tenant's limit is one running job
        assert second.status_code == 429 and "Retry-After" in second.headers
        job_id = first.json()["job_id"]
        with client_of("city-general") as other:
            assert other.get(f"{JOBS}/{job_id}").status_code == 404
            assert other.get(JOBS).json()["jobs"] == []
        finished = wait_for_job(marys, job_id)
        assert finished["state"] == "done" and [s["state"] for s in finished["slides"]] == ["done", "failed"]
        assert "tenant st-marys may not use PACS 'unanswered'" in finished["slides"][1]["error"]
        assert [j["job_id"] for j in marys.get(JOBS).json()["jobs"]] == [job_id]
    audit = "\n".join(p.read_text() for p in (tenant_config.storage.root / "audit").glob("audit-*.log*"))
    lines = [json.loads(line) for line in audit.splitlines() if '"wsi-submit"' in line]
    assert {line["status"] for line in lines if line["outcome"] == "rejected"} == {401, 403, 429}
    assert job_id in {line["request_id"] for line in lines if line["outcome"] == "ok"}
    assert "tumour.tiff" not in audit and str(slides["tumour"].parent) not in audit
