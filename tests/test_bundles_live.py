"""MONAI bundles and model versions served live: a Serve app beside the main one, on a repository of the model.yaml
model, its weights as two bundle versions (JSON + state dict, YAML + TorchScript) and a broken bundle. The bundles
segment the phantom series exactly as the model.yaml model does; the broken one is listed with its reason and the
others serve; deploying again after a version is added and another replaced restarts only those, and a request in
flight across the reload finishes."""

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import ray
from ray import serve

from helpers import (
    INFERENCE,
    MODEL,
    ZIP,
    beside_the_main_app,
    edit_json,
    insert_transform,
    load_mask,
    write_organ_bundle,
    zip_files,
)
from serve_app.app import build_app
from serve_app.config import EMBEDDED_MODEL_REPOSITORY

pytestmark = pytest.mark.cluster

PREFIX = "/bundles"
APP = "medserve-bundles"


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle-repository")
    shutil.copytree(EMBEDDED_MODEL_REPOSITORY / MODEL, root / MODEL)
    write_organ_bundle(root / "organ" / "1.0.0", "json", "pt", version="1.0.0")
    write_organ_bundle(root / "organ" / "1.1.0", "yaml", "ts", version="1.1.0")
    broken = write_organ_bundle(root / "broken", "json", "pt")
    edit_json(broken / INFERENCE, insert_transform({"_target_": "NormalizeIntensityd", "keys": "image"}))
    return root


@pytest.fixture(scope="module")
def bundle_app(server_url, app_config, repository):
    """The app on the bundle repository, on slivers of CPUs: the test cluster has room for the main app and one
    more. Deleted after this module."""
    sliver = {"num_cpus": 0.1}
    deployments = app_config.deployments.model_copy(
        update={
            name: getattr(app_config.deployments, name).model_copy(update=sliver)
            for name in ("ingress", "preprocess", "model", "postprocess")
        }
    )
    config = beside_the_main_app(
        app_config, name=APP, layout="split", deployments=deployments, model_repository=repository
    )
    serve.run(build_app(config), name=APP, route_prefix=PREFIX, blocking=False)
    yield config, server_url + PREFIX
    serve.delete(APP)


def test_models_list_their_versions_and_sources_and_the_refused_bundle(bundle_app):
    _, url = bundle_app
    listing = httpx.get(f"{url}/v1/models", timeout=60).json()
    models = {m["name"]: m for m in listing["models"]}
    assert sorted(models) == [MODEL, "organ"]
    assert (models[MODEL]["version"], models[MODEL]["source"]) == ("1.0.0", "model.yaml")
    organ = models["organ"]
    assert (organ["version"], organ["source"]) == ("1.1.0", "monai-bundle")
    assert [(v["version"], v["source"]) for v in organ["versions"]] == [
        ("1.1.0", "monai-bundle"),
        ("1.0.0", "monai-bundle"),
    ]
    assert organ["labels"] == {"0": "background", "1": "organ"}
    (refused,) = listing["refused"]
    assert (refused["name"], refused["path"]) == ("broken", "broken")
    assert "broken/configs/inference.json: preprocessing::transforms::3 (NormalizeIntensityd)" in refused["reason"]
    described = httpx.get(f"{url}/v1/models/organ", timeout=60).json()
    assert described == organ


def test_a_refused_bundle_answers_404_with_its_reason(bundle_app, phantom_series):
    _, url = bundle_app
    answer = httpx.post(f"{url}/v1/models/broken/segment", content=zip_files(phantom_series), headers=ZIP, timeout=60)
    assert answer.status_code == 404
    assert "was refused when the server started" in answer.json()["error"]["reason"]
    assert "NormalizeIntensityd" in answer.json()["error"]["reason"]
    unknown = httpx.post(f"{url}/v1/models/organ/versions/9.9.9/segment", content=b"x", headers=ZIP, timeout=60)
    assert unknown.status_code == 404 and "has no version '9.9.9'" in unknown.json()["error"]["reason"]


def test_bundles_segment_the_phantom_as_the_model_yaml_model_does(bundle_app, phantom_series):
    body = zip_files(phantom_series)
    masks, versions = {}, {}
    with httpx.Client(base_url=bundle_app[1].removesuffix(PREFIX), timeout=300) as client:  # mask_url has PREFIX
        for route in (f"{MODEL}/segment", "organ/segment", "organ/versions/1.0.0/segment"):
            answer = client.post(f"{PREFIX}/v1/models/{route}", content=body, headers=ZIP)
            assert answer.status_code == 200, answer.text
            versions[route] = (answer.json()["model"]["name"], answer.json()["model"]["version"])
            assert answer.json()["labels"][0]["volume_ml"] > 10
            masks[route] = np.asarray(load_mask(client, answer.json()).dataobj)
    assert versions == {
        f"{MODEL}/segment": (MODEL, "1.0.0"),
        "organ/segment": ("organ", "1.1.0"),  # the newest: YAML config, TorchScript weights
        "organ/versions/1.0.0/segment": ("organ", "1.0.0"),  # JSON config, state dict
    }
    reference = masks[f"{MODEL}/segment"]
    assert reference.sum() > 0
    for route, mask in masks.items():
        assert np.array_equal(mask, reference), f"{route}: {np.sum(mask != reference)} voxels differ"


def _replicas() -> dict[str, set[str]]:
    """The bundle app's live replica actors, by deployment."""
    replicas: dict[str, set[str]] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        _, _, rest = actor["name"].partition(f"SERVE_REPLICA::{APP}#")
        if rest:
            deployment, _, replica = rest.rpartition("#")
            replicas.setdefault(deployment, set()).add(replica)
    return replicas


def test_a_reload_serves_a_new_version_and_restarts_only_what_changed(bundle_app, repository, phantom_series):
    config, url = bundle_app
    body = zip_files(phantom_series)
    before = _replicas()
    assert {"Ingress", "Preprocess", "Postprocess", f"ModelReplica:{MODEL}", "ModelReplica:organ:1.1.0"} <= set(before)

    # A request in flight across the reload: its upload is held open until the new ingress replica runs (the old
    # one, replaced, waits for it; serve.run returns once the old one has stopped).
    new_ingress_runs = threading.Event()

    def slow_body():
        yield body[: len(body) // 2]
        new_ingress_runs.wait(timeout=300)
        time.sleep(2)
        yield body[len(body) // 2 :]

    with ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(
            httpx.post, f"{url}/v1/models/organ/segment", content=slow_body(), headers=ZIP, timeout=300
        )
        time.sleep(3)
        # A new version beside the others, and version 1.1.0 replaced (the same weights, one more file).
        write_organ_bundle(repository / "organ" / "1.2.0", "json", "pt", version="1.2.0")
        (repository / "organ" / "1.1.0" / "docs").mkdir()
        (repository / "organ" / "1.1.0" / "docs" / "README.md").write_text("replaced\n")
        reload = pool.submit(serve.run, build_app(config), name=APP, route_prefix=PREFIX, blocking=False)
        deadline = time.monotonic() + 300
        while _replicas().get("Ingress", set()) <= before["Ingress"] and time.monotonic() < deadline:
            time.sleep(1)
        new_ingress_runs.set()
        answer = in_flight.result()
        reload.result()
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == {"name": "organ", "version": "1.1.0"}  # the version it arrived for

    deadline = time.monotonic() + 120  # replaced replicas leave once their requests are done
    while (after := _replicas()) and not after["Ingress"].isdisjoint(before["Ingress"]) and time.monotonic() < deadline:
        time.sleep(1)
    for unchanged in ("Preprocess", "Postprocess", f"ModelReplica:{MODEL}", "ModelReplica:organ:1.0.0"):
        assert after[unchanged] == before[unchanged], f"{unchanged} was restarted"
    for changed in ("Ingress", "ModelReplica:organ:1.1.0"):
        assert after[changed].isdisjoint(before[changed]), f"{changed} was not redeployed"
    assert "ModelReplica:organ:1.2.0" in after

    with httpx.Client(base_url=url, timeout=300) as client:
        organ = client.get("/v1/models/organ").json()
        assert [v["version"] for v in organ["versions"]] == ["1.2.0", "1.1.0", "1.0.0"]
        newest = client.post("/v1/models/organ/segment", content=body, headers=ZIP)
        assert newest.status_code == 200 and newest.json()["model"]["version"] == "1.2.0", newest.text
