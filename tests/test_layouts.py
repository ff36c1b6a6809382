"""The fused layout (all stages in one replica) gives the split layout's answer."""

import gzip

import numpy as np
import pytest
from ray import serve

from helpers import SEGMENT, beside_the_main_app, dice, load_mask, make_room_for_an_app, zip_files
from serve_app.app import build_app

FUSED_PREFIX = "/fused"


@pytest.fixture(scope="module")
def fused_url(server_url, app_config):
    config = beside_the_main_app(app_config, layout="fused", name="medserve-fused")
    make_room_for_an_app(app_config.name)
    serve.run(build_app(config), name=config.name, route_prefix=FUSED_PREFIX, blocking=False)
    yield server_url + FUSED_PREFIX
    serve.delete(config.name)


def test_fused_layout_matches_split_layout(client, fused_url, phantom, phantom_series):
    body = zip_files(phantom_series)
    split = client.post(f"{SEGMENT}?keep_image=true", content=body)
    fused = client.post(f"{fused_url}{SEGMENT}?keep_image=true", content=body, timeout=300)
    assert split.status_code == fused.status_code == 200, fused.text
    split_mask, fused_mask = load_mask(client, split.json()), load_mask(client, fused.json())
    np.testing.assert_array_equal(np.asarray(split_mask.dataobj), np.asarray(fused_mask.dataobj))
    assert dice(np.asarray(fused_mask.dataobj) == 1, phantom.label) >= 0.9
    assert fused.json()["labels"] == split.json()["labels"]
    assert set(fused.json()["timings_ms"]) == set(split.json()["timings_ms"])
    # Either layout's preprocessing keeps the study's image, byte for byte the same NIfTI.
    split_image, fused_image = (
        client.get(answer.json()["mask_url"].replace("mask.nii.gz", "image")) for answer in (split, fused)
    )
    assert split_image.status_code == fused_image.status_code == 200, fused_image.text
    assert gzip.decompress(split_image.content) == gzip.decompress(fused_image.content)
