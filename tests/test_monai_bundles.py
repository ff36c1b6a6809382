"""MONAI bundles in the model repository, and versions side by side: the embedded model written as a bundle in
MONAI's format (configs/metadata.json, inference.json or .yaml, models/model.pt or model.ts) by MONAI's own writers,
read back with ConfigParser into the same spec as its model.yaml; what cannot be mapped refused with the file and the
field or transform named; ``medserve import-bundle`` and ``sample-bundle`` as a user runs them. No cluster."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from helpers import INFERENCE, METADATA, MODEL, edit_json, insert_transform, medserve, write_organ_bundle
from serve_app.app import read_checked_repository
from serve_app.config import EMBEDDED_MODEL_REPOSITORY, load_config
from serve_app.engines.torch_engine import build_network, check_network
from serve_app.errors import ModelNotFound
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import ModelRepositoryError
from serve_app.monai_bundle import InvalidBundle, read_bundle
from serve_app.samples.bundles import write_bundle

EMBEDDED = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get(MODEL)


@pytest.mark.parametrize(
    "config_format, weights, weights_file",
    [
        pytest.param("json", "pt", "models/model.pt", id="json config, state dict"),
        pytest.param("yaml", "ts", "models/model.ts", id="yaml config, TorchScript"),
        pytest.param("json", "both", "models/model.pt", id="both weights: the state dict of a MONAI network"),
    ],
)
def test_a_bundle_reads_into_the_same_spec_as_its_model_yaml(tmp_path, config_format, weights, weights_file):
    bundle = write_organ_bundle(tmp_path / "organ", config_format, weights)
    assert (bundle / "configs" / f"inference.{config_format}").is_file()
    spec = read_bundle(bundle, "organ")
    assert spec.source == "monai-bundle" and spec.weights.file == weights_file
    assert (spec.version, spec.modality, spec.task) == ("1.0.0", "CT", "segmentation")
    assert spec.preprocessing == EMBEDDED.preprocessing and spec.inference == EMBEDDED.inference
    assert {k: label.name for k, label in spec.labels.items()} == {0: "background", 1: "organ"}
    assert spec.network.name == "UNet" and spec.network.args == EMBEDDED.network.args
    check_network(spec)
    image = torch.rand((1, *EMBEDDED.input_item_shape))
    with torch.inference_mode():
        torch.testing.assert_close(build_network(spec).eval()(image), build_network(EMBEDDED).eval()(image))


def test_a_sliding_window_bundle_maps_its_inferer_and_spacing(tmp_path):
    preprocessing = EMBEDDED.preprocessing.model_copy(
        update={"spatial_size": None, "roi_size": (64, 64, 32), "target_spacing": (2.0, 2.0, 3.0)}
    )
    inference = EMBEDDED.inference.model_copy(update={"sw_batch_size": 2, "overlap": 0.5})
    sliding = EMBEDDED.model_copy(update={"preprocessing": preprocessing, "inference": inference})
    spec = read_bundle(write_bundle(sliding, tmp_path / "organ", "yaml"), "organ")
    assert spec.preprocessing == preprocessing and spec.inference == inference


@pytest.fixture
def repository(tmp_path) -> Path:
    """A repository of the model.yaml model (one version), and `organ` in three versions: two bundles, one yaml."""
    shutil.copytree(EMBEDDED_MODEL_REPOSITORY / MODEL, tmp_path / MODEL)
    write_organ_bundle(tmp_path / "organ" / "1.9.0", "json", "pt", version="1.9.0")
    write_organ_bundle(tmp_path / "organ" / "1.10.0", "yaml", "ts", version="1.10.0")
    as_yaml = tmp_path / "organ" / "0.1.0"
    shutil.copytree(EMBEDDED_MODEL_REPOSITORY / MODEL, as_yaml)
    text = (as_yaml / "model.yaml").read_text()
    (as_yaml / "model.yaml").write_text(text.replace(f"name: {MODEL}", "name: organ").replace('"1.0.0"', '"0.1.0"'))
    return tmp_path


def test_versions_sit_side_by_side_and_the_newest_answers(repository):
    models = ModelRepository(repository)
    assert sorted(models.names()) == [MODEL, "organ"]
    assert [(s.version, s.source) for s in models.versions("organ")] == [
        ("1.10.0", "monai-bundle"),
        ("1.9.0", "monai-bundle"),
        ("0.1.0", "model.yaml"),
    ]
    assert models.get("organ").version == "1.10.0" and models.get("organ", "0.1.0").source == "model.yaml"
    assert models.get("organ").key == "organ:1.10.0" and models.get(MODEL).key == MODEL  # deployments' names
    with pytest.raises(ModelNotFound, match=r"model 'organ' has no version '2.0.0'; this server has 1.10.0, 1.9.0"):
        models.get("organ", "2.0.0")
    assert models.refused == []


def test_a_version_folder_must_agree_with_the_version_inside(repository):
    (repository / "organ" / "1.9.0").rename(repository / "organ" / "1.9.1")
    models = ModelRepository(repository)
    (refused,) = models.refused
    assert (refused.name, refused.version, refused.path) == ("organ", "1.9.1", "organ/1.9.1")
    assert refused.reason == "organ/1.9.1/configs: version '1.9.0' differs from its folder '1.9.1'"
    assert [s.version for s in models.versions("organ")] == ["1.10.0", "0.1.0"]


def test_the_folder_digest_follows_its_files(repository):
    before = ModelRepository(repository).get("organ", "1.9.0").digest
    (repository / "organ" / "1.9.0" / "docs").mkdir()
    (repository / "organ" / "1.9.0" / "docs" / "README.md").write_text("replaced")
    after = ModelRepository(repository)
    assert after.get("organ", "1.9.0").digest != before  # Serve redeploys this version on a reload
    assert after.get("organ", "1.10.0").digest == ModelRepository(repository).get("organ", "1.10.0").digest


def _transform_option(index: int, **options):
    return lambda config: config["preprocessing"]["transforms"][index].update(options)


def _channel_def(channels: dict, num_channels: int):
    def change(metadata):
        metadata["network_data_format"]["outputs"]["pred"].update(channel_def=channels, num_channels=num_channels)

    return change


def _edited(file: str, change):
    """A damage: ``change`` applied to the bundle's JSON ``file``."""
    return lambda bundle: edit_json(bundle / file, change)


@pytest.mark.parametrize(
    "damage, expected",
    [
        pytest.param(
            _edited(INFERENCE, insert_transform({"_target_": "NormalizeIntensityd", "keys": "image"})),
            "configs/inference.json: preprocessing::transforms::3 (NormalizeIntensityd): a transform medserve does "
            "not run",
            id="unknown transform",
        ),
        pytest.param(
            _edited(INFERENCE, insert_transform({"_target_": "scripts.transforms.MyWindowd", "keys": "image"})),
            "preprocessing::transforms::3 (scripts.transforms.MyWindowd): a transform medserve does not run",
            id="a bundle's own transform",
        ),
        pytest.param(
            _edited(
                INFERENCE,
                insert_transform({"_target_": "Spacingd", "keys": "image", "pixdim": [1, 1, 1], "mode": "nearest"}, 2),
            ),
            "preprocessing::transforms::2 (Spacingd) mode: 'nearest': medserve resamples bilinearly",
            id="spacing by nearest neighbour",
        ),
        pytest.param(
            _edited(INFERENCE, _transform_option(3, clip=False)),
            "(ScaleIntensityRanged) clip: False: medserve clips to the window (give clip true)",
            id="unclipped intensity range",
        ),
        pytest.param(
            _edited(INFERENCE, _transform_option(2, as_closest_canonical=True)),
            "preprocessing::transforms::2 (Orientationd) as_closest_canonical: an option medserve does not map",
            id="orientation option",
        ),
        pytest.param(
            _edited(INFERENCE, insert_transform({"_target_": "Orientationd", "keys": "image", "axcodes": "LPS"}, 5)),
            "preprocessing::transforms::5 (Orientationd): out of order or repeated",
            id="orientation after resize",
        ),
        pytest.param(
            _edited(INFERENCE, lambda config: config["preprocessing"]["transforms"].pop(2)),
            "configs/inference.json: preprocessing::transforms: no Orientation(d)",
            id="no orientation",
        ),
        pytest.param(
            _edited(INFERENCE, lambda config: config.pop("inferer")),
            "configs/inference.json: inferer: missing",
            id="no inferer",
        ),
        pytest.param(
            _edited(
                INFERENCE,
                lambda config: config["postprocessing"]["transforms"].__setitem__(
                    0, {"_target_": "Activationsd", "keys": "pred", "sigmoid": True}
                ),
            ),
            "postprocessing::transforms::0 (Activationsd): sigmoid outputs",
            id="sigmoid output",
        ),
        pytest.param(
            _edited(INFERENCE, _transform_option(3, a_min="@window_low")),
            "preprocessing::transforms::3::a_min: cannot be resolved",
            id="a reference to nothing",
        ),
        pytest.param(
            _edited(
                METADATA, lambda metadata: metadata["network_data_format"]["inputs"]["image"].update(modality="PET")
            ),
            "configs/metadata.json: network_data_format.inputs.image.modality: 'PET': medserve serves CT and MR",
            id="modality",
        ),
        pytest.param(
            _edited(METADATA, lambda metadata: metadata.pop("version")),
            "configs/metadata.json: version: missing",
            id="no version",
        ),
        pytest.param(
            _edited(METADATA, _channel_def({"0": "background", "1": "organ", "2": "vessel"}, 2)),
            "configs/metadata.json: network_data_format.outputs.pred.channel_def: names 3 channels; num_channels "
            "says 2",
            id="label map against num_channels",
        ),
        pytest.param(
            _edited(METADATA, _channel_def({"0": "background", "1": "organ", "2": "vessel"}, 3)),
            "models/model.pt: the network gives 2 output channels; network_data_format.outputs channel_def names 3",
            id="label map against the network's output",
        ),
        pytest.param(
            _edited(METADATA, _channel_def({"1": "organ", "2": "vessel"}, 2)),
            "channels must be 0..C-1 with C >= 2, 0 the background (got [1, 2])",
            id="label map without background",
        ),
        pytest.param(
            lambda bundle: (bundle / METADATA).unlink(),
            "organ/configs/metadata.json: metadata.json: missing",
            id="no metadata",
        ),
        pytest.param(
            lambda bundle: (bundle / INFERENCE).write_text((bundle / INFERENCE).read_text()[:-40]),
            "organ/configs/inference.json: (the whole file): cannot be parsed",
            id="truncated config",
        ),
        pytest.param(
            lambda bundle: (bundle / "configs" / "inference.yaml").write_text("network_def: [unclosed\n"),
            "organ/configs: inference.json or inference.yaml: 2 of them; keep one",
            id="two configs",
        ),
        pytest.param(
            lambda bundle: (bundle / "models" / "model.pt").unlink(),
            "organ/models: model.pt or model.ts: missing",
            id="no weights",
        ),
        pytest.param(
            lambda bundle: torch.save({"conv.weight": torch.zeros(3)}, bundle / "models" / "model.pt"),
            "organ/models/model.pt: does not load into the network: Error(s) in loading state_dict for UNet",
            id="weights of another network",
        ),
        pytest.param(
            lambda bundle: (bundle / "models" / "model.pt").write_bytes(b"not a checkpoint"),
            "organ/models/model.pt: does not load into the network",
            id="corrupt weights",
        ),
    ],
)
def test_a_bundle_that_cannot_be_mapped_is_refused_naming_the_file_and_field(tmp_path, damage, expected):
    shutil.copytree(EMBEDDED_MODEL_REPOSITORY / MODEL, tmp_path / MODEL)
    damage(write_organ_bundle(tmp_path / "organ"))
    repository = read_checked_repository(load_config(overrides={"model_repository": str(tmp_path)}))
    assert repository.names() == [MODEL]  # the good model is served
    (refused,) = repository.refused
    assert (refused.name, refused.path) == ("organ", "organ")
    assert expected in refused.reason, refused.reason
    assert str(tmp_path) not in refused.reason  # paths inside the repository only: API clients see the reason
    with pytest.raises(ModelNotFound, match="model 'organ' was refused when the server started: "):
        repository.get("organ")


def test_a_repository_of_only_broken_models_fails_with_every_reason(tmp_path):
    edit_json(write_organ_bundle(tmp_path / "organ") / METADATA, lambda metadata: metadata.pop("version"))
    with pytest.raises(ModelRepositoryError, match=r"holds no usable model\norgan/configs/metadata.json: version"):
        ModelRepository(tmp_path)


def test_invalid_bundle_pickles_with_its_file_and_field(tmp_path):
    import pickle

    error = InvalidBundle(tmp_path / "configs" / "inference.json", "inferer", "missing")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.file, copy.field, str(copy)) == (error.file, "inferer", str(error))


def test_yaml_bundles_are_read_with_their_references_resolved(tmp_path):
    bundle = write_organ_bundle(tmp_path / "organ", "yaml")
    config_path = bundle / "configs" / "inference.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["window"] = {"low": -57, "high": 164}
    config["preprocessing"]["transforms"][3].update(a_min="@window::low", a_max="$@window::high + 0")
    config["network_def"]["out_channels"] = "@num_labels"
    config["num_labels"] = 2
    config_path.write_text(yaml.safe_dump(config))
    spec = read_bundle(bundle, "organ")
    assert spec.preprocessing.intensity_window == EMBEDDED.preprocessing.intensity_window
    assert spec.network.args["out_channels"] == 2


# --- the commands, as a user runs them ------------------------------------------------------------------------------


def test_sample_bundle_then_import_bundle_copies_a_checked_bundle_into_the_repository(tmp_path):
    written = medserve("sample-bundle", str(tmp_path / "organ-bundle"), "--format", "yaml", "--weights", "ts")
    assert written.returncode == 0, written.stderr
    repository = tmp_path / "repo"
    repository.mkdir()
    imported = medserve(
        "import-bundle", str(tmp_path / "organ-bundle"), "--name", "organ", "--repository", str(repository)
    )
    assert imported.returncode == 0, imported.stderr
    assert (
        f"imported organ version 1.0.0 (models/model.ts, labels background, organ) into {repository}/organ/1.0.0"
        in (imported.stdout)
    )
    assert ModelRepository(repository).get("organ").source == "monai-bundle"
    again = medserve(
        "import-bundle", str(tmp_path / "organ-bundle"), "--name", "organ", "--repository", str(repository)
    )
    assert again.returncode == 2 and "version 1.0.0 is there (--replace replaces it)" in again.stderr
    assert not list((repository / "organ").glob(".importing-*"))


def test_import_bundle_refuses_a_broken_bundle_in_one_line(tmp_path):
    bundle = write_organ_bundle(tmp_path / "organ")
    edit_json(bundle / INFERENCE, insert_transform({"_target_": "CropForegroundd", "keys": "image"}))
    (tmp_path / "repo").mkdir()
    result = medserve("import-bundle", str(bundle), "--repository", str(tmp_path / "repo"))
    assert result.returncode == 2
    assert result.stderr.startswith("medserve: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot be served: " in result.stderr
    assert "configs/inference.json: preprocessing::transforms::3 (CropForegroundd)" in result.stderr
    assert list((tmp_path / "repo").iterdir()) == []


def test_import_bundle_will_not_write_into_the_embedded_repository(tmp_path):
    result = medserve("import-bundle", str(write_organ_bundle(tmp_path / "organ")))
    assert result.returncode == 2 and "give --repository DIR" in result.stderr
