"""Rollouts live (docs/rollouts.md): a model with three versions (1.0.0 live; 1.1.0 the same network; 1.2.0 its
weights perturbed) in an application of its own beside the main one, fused layout (one replica per version), its
rollout changed between tests by deploying it again (only the ingress restarts).

- shadow with the same network: every shadowed study agrees (Dice 1.0), shadow results are kept, marked and paired,
  never sent to a PACS; the live p99 with shadowing against without, and the noise floor of two runs without;
  `medserve rollout abort`;
- shadow with perturbed weights: agreement drops, the rollout aborts itself, audited, traffic back to live;
- canary: each study answered by the version its hash gives it (the split's ±5 % over 200 studies is
  test_rollout_config's), the same study again by the same version; `medserve rollout promote`;
- a WSI job's shadow (the tile model he-tile-tumour, 1.0.0 live, 1.1.0 the same network, 1.2.0 perturbed): the
  candidate's heatmap of the same network equals the live one (tumour Dice 1.0, heatmap difference 0), kept apart
  from the live results; a perturbed candidate disagrees and the rollout aborts itself. Its rollout rides on the
  deployments of the two shadow tests above (the same config, so no redeploy), one small slide each.

Studies are small NIfTI phantoms, each made distinct by one voxel: cheap requests.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
import zarr
from ray import serve

from helpers import TEST_WSI, WSI_JOBS, exported_total, make_room_for_an_app, medserve, wait_for_job
from serve_app.app import build_app
from serve_app.config import load_config
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.synthetic_slides import write_slide
from serve_app.segmentation.rollouts import rollout_id, share_of, study_identity
from serve_app.wsi.job_driver import SHADOW_FOLDER

APP, PREFIX = "medserve-rollouts", "/rollouts"
MODEL = "organ"
SEGMENT = f"/v1/models/{MODEL}/segment"
ROLLOUT = f"/v1/models/{MODEL}/rollout"
PINNED = f"/v1/models/{MODEL}/versions/1.0.0/segment"
EMBEDDED = Path(__file__).parent.parent / "serve_app" / "models" / "ct-phantom-organ"
TILES = "he-tile-tumour"
TILES_ROLLOUT = f"/v1/models/{TILES}/rollout"
# The two shadow tests' rollouts of the organ model, and the tile model's beside each (a WSI test reuses the deploy).
SAME_NETWORK = {"candidate": "1.1.0", "live": "1.0.0", "mode": "shadow", "fraction": 1.0}
PERTURBED = {
    "candidate": "1.2.0",
    "live": "1.0.0",
    "mode": "shadow",
    "abort": {"min_studies": 3, "agreement_window": 5},
}
TILES_SAME_NETWORK = {"candidate": "1.1.0", "live": "1.0.0", "mode": "shadow"}
TILES_PERTURBED = {"candidate": "1.2.0", "live": "1.0.0", "mode": "shadow", "abort": {"min_studies": 1}}


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rollout-models")
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        folder = root / MODEL / version
        shutil.copytree(EMBEDDED, folder)
        spec = (folder / "model.yaml").read_text()
        (folder / "model.yaml").write_text(
            spec.replace("name: ct-phantom-organ", f"name: {MODEL}").replace(
                'version: "1.0.0"', f'version: "{version}"'
            )
        )
        tiles = root / TILES / version
        shutil.copytree(EMBEDDED.with_name(TILES), tiles)
        text = (tiles / "model.yaml").read_text()
        (tiles / "model.yaml").write_text(text.replace('version: "1.0.0"', f'version: "{version}"'))
    # 1.2.0: every weight perturbed by noise of its tensor's own spread: a network that no longer finds the organ, or
    # that calls every tile of the WSI tests' slide tumour (tumour Dice 0.78). The tile network's BatchNorm running
    # statistics are left alone: a negative variance would make it answer NaN rather than disagree.
    for model, spread in ((MODEL, 0.8), (TILES, 2.0)):
        weights = torch.load(root / model / "1.2.0" / "model.pt", weights_only=True)
        generator = torch.Generator().manual_seed(0)
        for name, tensor in weights.items():
            if tensor.is_floating_point() and tensor.numel() > 1 and "running_" not in name:
                tensor += torch.randn(tensor.shape, generator=generator) * tensor.std() * spread
        torch.save(weights, root / model / "1.2.0" / "model.pt")
    return root


@pytest.fixture(scope="module")
def deploy(server_url, app_config, repository, tmp_path_factory, slide_root):
    """Deploys the rollout app with ``rollout`` as ``rollouts.organ`` (and ``tiles`` as the tile model's); returns its
    URL and the config file's path (for the CLI). Deploying the same again changes nothing."""
    storage = tmp_path_factory.mktemp("rollout-storage")
    config_path = storage.parent / "rollout-app.yaml"
    make_room_for_an_app(app_config.name)

    def deploy_with(rollout: dict, tiles: dict | None = None) -> tuple[str, Path]:
        config = load_config(
            overrides={
                "name": APP,
                "layout": "fused",
                "model_repository": str(repository),
                "storage.root": str(storage),
                "http.port": app_config.http.port,
                "grpc": app_config.grpc.model_dump(),
                "models": {MODEL: {"num_cpus": 0.25, "batching": {"max_batch_size": 1}}},
                "pacs.main": {"url": "http://127.0.0.1:9/dicom-web"},
                **TEST_WSI,
                "wsi.slide_roots": [str(slide_root)],
                "rollouts": {MODEL: rollout, **({TILES: tiles} if tiles else {})},
            }
        )
        config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        serve.run(build_app(config), name=APP, route_prefix=PREFIX, blocking=False)
        url = server_url + PREFIX
        _wait_for_rollout(url, rollout_id(MODEL, config.rollouts[MODEL]))
        return url, config_path

    yield deploy_with
    serve.delete(APP)


def _wait_for_rollout(url: str, expected_id: str, timeout_s: float = 300) -> None:
    """Until the ingress that answers is the one of this rollout (a redeploy replaces it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{url}{ROLLOUT}", timeout=10)
            if answer.status_code == 200 and answer.json().get("rollout_id") == expected_id:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the rollout app did not come up with rollout {expected_id}")


_PHANTOM = ct_phantom(np.random.default_rng(10_077), shape=(48, 48, 16))


def study(n: int) -> bytes:
    """A small NIfTI phantom, distinct for each ``n`` (one voxel far from the organ)."""
    volume = _PHANTOM.volume.array.astype(np.int16)
    volume.flat[n % volume.size] = -1000 + n
    return nib.Nifti1Image(volume, _PHANTOM.volume.affine).to_bytes()


def until(read, timeout_s: float = 60):
    """``read()``'s first truthy value, polled; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := read()):
        assert time.monotonic() < deadline, f"timed out: {value!r}"
        time.sleep(0.2)
    return value


def identity_of(body: bytes, tmp_path: Path) -> str:
    folder = tmp_path / "identity"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "study.nii.gz").write_bytes(body)
    return study_identity(folder)


def segment(client: httpx.Client, url: str, body: bytes, route: str = SEGMENT) -> tuple[dict, float]:
    start = time.perf_counter()
    answer = client.post(f"{url}{route}", content=body, headers={"content-type": "application/octet-stream"})
    seconds = time.perf_counter() - start
    assert answer.status_code == 200, answer.text
    return answer.json(), seconds


def report(client: httpx.Client, url: str) -> dict:
    answer = client.get(f"{url}{ROLLOUT}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def _segmented(client: httpx.Client, url: str, body: bytes) -> dict | None:
    try:
        return segment(client, url, body)[0]
    except httpx.TransportError:
        return None


def _answered(client: httpx.Client, url: str) -> dict | None:
    try:
        answer = client.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return answer.json() if answer.status_code == 200 else None


def paced(send, count: int, interval_s: float) -> list:
    """``send(n)`` for n in range(count), started ``interval_s`` apart (or at once after a slower one)."""
    answers, start = [], time.monotonic()
    for n in range(count):
        time.sleep(max(0.0, start + n * interval_s - time.monotonic()))
        answers.append(send(n))
    return answers


def p99(seconds: list[float]) -> float:
    return float(np.quantile(seconds, 0.99))


def audit_lines(storage: Path) -> list[dict]:
    return [
        json.loads(line) for path in (storage / "audit").glob("audit-*.log") for line in path.read_text().splitlines()
    ]


def test_a_model_without_a_rollout_has_none_to_report(client):
    answer = client.get("/v1/models/ct-phantom-organ/rollout")
    assert answer.status_code == 404 and "has no rollout configured" in answer.json()["error"]["reason"]


def test_shadow_of_the_same_network_agrees_everywhere_and_leaves_the_live_p99_alone(deploy, capsys):
    url, config_path = deploy(SAME_NETWORK, TILES_SAME_NETWORK)
    storage = load_config(config_path).storage.root
    runs = 10

    def routed():
        return sum(report(client, url)["counts"][k] for k in ("shadow", "shadow_errors", "dropped"))

    with httpx.Client(timeout=120) as client:
        warm = [segment(client, url, study(1000 + n))[1] for n in range(2)]  # both replicas warm
        # Studies arriving at a steady rate the machine can serve with its candidate beside it (2.5 times a live
        # answer's time apart, as a hospital's studies arrive rather than all at once): the live p99 with shadowing.
        interval = 2.5 * warm[-1]
        # Before and after, the same live version without shadowing (the route that names the version is never
        # rerouted nor shadowed), bracketing it in time: the machine's drift and jitter meanwhile are the noise floor.
        before = paced(lambda n: segment(client, url, study(100 + n), PINNED)[1], runs, interval)
        shadowed = paced(lambda n: segment(client, url, study(n)), runs, interval)
        after_ = paced(lambda n: segment(client, url, study(150 + n), PINNED)[1], runs, interval)
        assert {answer["model"]["version"] for answer, _ in shadowed} == {"1.0.0"}
        until(lambda: routed() >= runs + 2)
        # Under load the candidate's work is the first shed: of 6 studies at once, the replica's two shadow slots
        # (max_shadow_in_flight) take two; the others are dropped, and counted.
        dropped_before = report(client, url)["counts"]["dropped"]
        with ThreadPoolExecutor(6) as pool:
            burst = list(pool.map(lambda n: segment(client, url, study(500 + n)), range(6)))
        assert {answer["model"]["version"] for answer, _ in burst} == {"1.0.0"}
        until(lambda: routed() >= runs + 8)
        state = report(client, url)
        counts = state["counts"]
        assert counts["dropped"] - dropped_before >= 3, counts
        assert state["mode"] == "shadow" and state["state"] == "running"
        assert counts["shadow_errors"] == 0 and counts["live"] == runs + 8 and counts["shadow"] >= runs
        assert state["mean_dice"] == 1.0 and state["window_studies"] == counts["shadow"]
        assert state["mean_volume_difference_ml"] == {"organ": 0.0}

        # A shadow result: kept, marked, paired with its live result; never sent to a PACS.
        records = [json.loads(line) for line in next(storage.glob("rollouts/*/organ/runs-*.jsonl")).read_text().split()]
        shadow_id, live_id = next(
            (r["result_id"], r["live_result_id"]) for r in records if r["role"] == "shadow" and r["outcome"] == "ok"
        )
        live_summary = client.get(f"{url}/v1/results/{live_id}").json()
        assert live_summary["rollout"] == {"role": "live", "version": "1.0.0", "paired_result_id": None}
        shadow_summary = client.get(f"{url}/v1/results/{shadow_id}").json()
        assert shadow_summary["rollout"] == {"role": "shadow", "version": "1.1.0", "paired_result_id": live_id}
        assert shadow_summary["labels"] == live_summary["labels"]
        stored = client.post(f"{url}/v1/results/{shadow_id}/store", json={"pacs": "main"})
        assert stored.status_code == 409 and "never sent to a PACS" in stored.json()["error"]["reason"]

        # Aborted by the operator: answered by the live version, and no shadow run any more.
        aborted = medserve("rollout", "abort", MODEL, "--config", str(config_path), "--reason", "measured")
        assert aborted.returncode == 0, aborted.stderr
        assert "is aborted: the live version answers every study" in aborted.stdout
        until(lambda: report(client, url)["state"] == "aborted", timeout_s=10)
        segment(client, url, study(199))
        after = report(client, url)
        assert after["counts"]["shadow"] == counts["shadow"]  # no shadow run once aborted
        assert after["reason"].startswith("measured (medserve rollout abort by ")
    plain = before + after_
    with_shadow, first, second = p99([s for _, s in shadowed]), p99(before), p99(after_)
    # The noise floor, measured here without shadowing: how far two runs' p99 differ, or how far the p99 lies above
    # the median (this machine's jitter, other processes included), whichever is more; and never under half a live
    # answer, so that one hiccup of a busy 2-core machine does not fail the test, while a shadow run the live answer
    # waited for (a whole candidate run more, as long as a live answer) still does.
    floor = max(abs(first - second), p99(plain) - float(np.median(plain)), 0.5 * float(np.median(plain)))
    with capsys.disabled():
        print(
            f"\nlive p99 over {runs} requests {interval * 1000:.0f} ms apart: {with_shadow * 1000:.0f} ms with "
            f"shadowing, {first * 1000:.0f} before and {second * 1000:.0f} ms after without (noise floor "
            f"{floor * 1000:.0f} ms)"
        )
    assert with_shadow <= max(first, second) + floor, (with_shadow, first, second, floor)
    line = next(line for line in audit_lines(storage) if line.get("route") == "rollout" and "event" in line)
    assert (line["event"], line["model"], line["model_version"], line["reason"]) == (
        "aborted",
        MODEL,
        "1.1.0",
        "measured",
    )


def tiles_report(client: httpx.Client) -> dict:
    answer = client.get(TILES_ROLLOUT)
    assert answer.status_code == 200, answer.text
    return answer.json()


def shadowed_slide(client: httpx.Client, slide: Path) -> dict:
    """A job of ``slide`` through the tile model, once it has ended."""
    submitted = client.post(WSI_JOBS, json={"model": TILES, "slides": [str(slide)]})
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(client, submitted.json()["job_id"], timeout_s=120)
    assert job["state"] == "done" and job["model_version"] == "1.0.0", job
    return job


def rollout_slide(slide_root: Path, name: str, seed: int) -> Path:
    """A small slide, half of its tissue tumour, in the slide root the apps allow."""
    slide = slide_root / "rollouts" / f"{name}.tiff"
    slide.parent.mkdir(exist_ok=True)
    write_slide(slide, 1800, 1400, seed=seed, tumour_fraction=0.5)
    return slide


def test_a_wsi_shadow_of_the_same_tile_network_agrees_and_stays_out_of_the_live_results(deploy, slide_root):
    url, config_path = deploy(SAME_NETWORK, TILES_SAME_NETWORK)
    slide = rollout_slide(slide_root, "same", seed=11)
    with httpx.Client(base_url=url, timeout=60) as client:
        job = shadowed_slide(client, slide)
        state = until(lambda: (r := tiles_report(client))["counts"]["shadow"] == 1 and r)
        assert (state["mode"], state["state"], state["live"], state["candidate"]) == (
            "shadow",
            "running",
            "1.0.0",
            "1.1.0",
        )
        assert state["counts"]["live"] == 1 and state["counts"]["shadow_errors"] == 0
        assert (state["mean_dice"], state["mean_heatmap_difference"], state["mean_tumour_area_difference_mm2"]) == (
            1.0,
            0.0,
            0.0,
        )
        live = job["slides"][0]
        assert live["summary"]["tiles_positive"] > 0  # a slide with tumour: the Dice compares something
        # The candidate's outputs: apart from the live ones, marked, its heatmap the live one's.
        out, key = Path(job["out_path"]), live["key"]
        shadow = out / SHADOW_FOLDER / "1.1.0" / key
        summary = json.loads((shadow / "summary.json").read_text())
        assert summary["rollout"] == {
            "role": "shadow",
            "version": "1.1.0",
            "live_version": "1.0.0",
            "job_id": job["job_id"],
            "slide_index": 0,
        }
        assert (
            summary["agreement"]["mean_dice"] == 1.0
            and summary["tumour_area_mm2"] == live["summary"]["tumour_area_mm2"]
        )
        heatmaps = [zarr.open_array(folder / "heatmap.zarr", mode="r") for folder in (out / key, shadow)]
        assert heatmaps[1].attrs["model_version"] == "1.1.0" and heatmaps[0].attrs["model_version"] == "1.0.0"
        np.testing.assert_array_equal(heatmaps[0][:], heatmaps[1][:])
        assert (shadow.stat().st_mode & 0o777, (shadow / "summary.json").stat().st_mode & 0o777) == (0o700, 0o600)
        served = client.get(f"{WSI_JOBS}/{job['job_id']}/slides/0/summary.json").json()
        assert "rollout" not in served and served["tiles_positive"] == live["summary"]["tiles_positive"]
    submits = [line for line in audit_lines(load_config(config_path).storage.root) if line.get("route") == "wsi-submit"]
    assert [(line["model"], line["model_version"]) for line in submits] == [(TILES, "1.0.0")]  # the version that ran


def test_a_perturbed_candidate_disagrees_the_rollout_aborts_itself_and_stays_aborted_past_a_restart(deploy):
    url, config_path = deploy(PERTURBED, TILES_PERTURBED)
    storage = load_config(config_path).storage.root
    with httpx.Client(timeout=120) as client:
        # Until it aborts: the window judged from its third shadowed study (some are dropped, their slots busy).
        for n in range(20):
            answer, _ = segment(client, url, study(200 + n))
            assert answer["model"]["version"] == "1.0.0"
            if report(client, url)["state"] == "aborted":
                break
        state = until(lambda: (r := report(client, url))["state"] == "aborted" and r, timeout_s=60)
        assert state["mean_dice"] < 0.9 and state["window_studies"] >= 3
        assert (
            state["reason"].startswith("mean Dice ") and "below abort.min_mean_dice 0.9 (medserve)" in state["reason"]
        )
        # The ingress replica killed: Serve starts another, which finds the rollout aborted in the shared storage.
        import ray

        prefix = f"SERVE_REPLICA::{APP}#Ingress#"
        replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        restarted = until(lambda: _answered(client, f"{url}{ROLLOUT}"), timeout_s=120)
        assert (restarted["state"], restarted["reason"]) == ("aborted", state["reason"])
        shadows = restarted["counts"]["shadow"]
        # Traffic back to live: answered by 1.0.0, and the candidate runs no more. (A connection HAProxy kept to the
        # killed replica may be cut once: sent again then, as a client retries a dropped connection.)
        answer = until(lambda: _segmented(client, url, study(300)), timeout_s=60)
        assert answer["model"]["version"] == "1.0.0"
        time.sleep(1)
        assert report(client, url)["counts"]["shadow"] == shadows
    line = next(
        line
        for line in audit_lines(storage)
        if line.get("route") == "rollout" and "event" in line and line["model_version"] == "1.2.0"
    )
    assert line["event"] == "aborted" and line["by"] == "medserve" and line["reason"].startswith("mean Dice ")
    assert until(lambda: exported_total("ray_medserve_rollout_aborted_total", model=MODEL, version="1.2.0"))
    assert exported_total("ray_medserve_rollout_runs_total", model=MODEL, version="1.2.0", role="shadow") >= 3


def test_a_perturbed_tile_candidate_disagrees_on_a_slide_and_the_rollout_aborts_itself(deploy, slide_root):
    url, _ = deploy(PERTURBED, TILES_PERTURBED)
    slide = rollout_slide(slide_root, "perturbed", seed=12)
    with httpx.Client(base_url=url, timeout=60) as client:
        job = shadowed_slide(client, slide)
        state = until(lambda: (r := tiles_report(client))["state"] == "aborted" and r)
        assert state["counts"]["shadow"] == 1 and state["mean_dice"] < 0.9 and state["mean_heatmap_difference"] > 0.1
        assert state["mean_tumour_area_difference_mm2"] > 0  # it calls tissue tumour that the live version does not
        assert (
            state["reason"].startswith("mean Dice ") and "below abort.min_mean_dice 0.9 (medserve)" in state["reason"]
        )
        assert job["slides"][0]["state"] == "done"  # the live results, whatever the candidate did
    assert until(lambda: exported_total("ray_medserve_rollout_aborted_total", model=TILES, version="1.2.0"))
    assert exported_total("ray_medserve_rollout_runs_total", model=TILES, version="1.2.0", role="shadow") == 1


def test_a_canary_answers_by_the_weight_sticks_to_the_study_and_is_promoted(deploy, tmp_path):
    rollout = {"candidate": "1.1.0", "live": "1.0.0", "mode": "canary", "weight": 30}
    url, config_path = deploy(rollout)
    identity = rollout_id(MODEL, load_config(config_path).rollouts[MODEL])
    bodies = [study(400 + n) for n in range(30)]
    expected = ["1.1.0" if share_of(identity, identity_of(b, tmp_path)) < 0.30 else "1.0.0" for b in bodies]
    assert 0 < expected.count("1.1.0") < len(bodies)
    with httpx.Client(timeout=120) as client:
        versions = [segment(client, url, body)[0]["model"]["version"] for body in bodies]
        assert versions == expected
        again = [segment(client, url, bodies[n])[0] for n in range(6)]
        assert [a["model"]["version"] for a in again] == expected[:6]  # the same study, the same version
        canary = next(a for a in again if a["model"]["version"] == "1.1.0")
        summary = client.get(f"{url}/v1/results/{canary['result_id']}").json()
        assert summary["rollout"] == {"role": "canary", "version": "1.1.0", "paired_result_id": None}
        canaries = versions.count("1.1.0") + expected[:6].count("1.1.0")
        state = until(lambda: (r := report(client, url))["counts"]["canary"] == canaries and r)  # recorded after
        assert state["weight"] == 30 and state["fraction"] is None and state["error_ratio"] == 0

        promoted = medserve("rollout", "promote", MODEL, "--config", str(config_path))
        assert promoted.returncode == 0, promoted.stderr
        until(lambda: report(client, url)["state"] == "promoted", timeout_s=10)
        after = [segment(client, url, body)[0]["model"]["version"] for body in bodies[:4]]
        assert after == ["1.1.0"] * 4
        again = medserve("rollout", "abort", MODEL, "--config", str(config_path))
        assert again.returncode == 2 and "is already promoted" in again.stderr
