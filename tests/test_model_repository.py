import shutil

import pytest
from pydantic import ValidationError

from helpers import properties_without_description
from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.errors import ModelNotFound
from serve_app.model_repository import ModelRepository
from serve_app.model_spec import ANATOMICAL_STRUCTURE, CodeSpec, InferenceSpec, LabelSpec, ModelRepositoryError


def test_embedded_repository_lists_the_default_model():
    repository = ModelRepository(EMBEDDED_MODEL_REPOSITORY)
    spec = repository.get("ct-phantom-organ")
    names = {value: label.name for value, label in spec.labels.items()}
    assert spec.modality == "CT" and names == {0: "background", 1: "organ"}
    assert spec.labels[1].code == CodeSpec(value="78961009", scheme="SCT", meaning="Spleen")
    assert spec.weights_path.stat().st_size < 4 * 1024 * 1024


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ModelNotFound, match="ct-phantom-organ"):
        ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("liver")


@pytest.fixture
def repo_copy(tmp_path):
    shutil.copytree(EMBEDDED_MODEL_REPOSITORY / "ct-phantom-organ", tmp_path / "ct-phantom-organ")
    return tmp_path


def test_invalid_model_yaml_names_the_file_and_field(repo_copy):
    yaml_path = repo_copy / "ct-phantom-organ" / "model.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("a_max: 164", "a_max: -100"))
    with pytest.raises(ModelRepositoryError, match=r"model\.yaml is invalid:\n.*preprocessing\.intensity_window"):
        ModelRepository(repo_copy)


def test_missing_weights_are_reported_at_start(repo_copy):
    (repo_copy / "ct-phantom-organ" / "model.pt").unlink()
    with pytest.raises(ModelRepositoryError, match="weights file model.pt not found"):
        ModelRepository(repo_copy)


def test_folder_and_name_must_agree(repo_copy):
    (repo_copy / "ct-phantom-organ").rename(repo_copy / "other")
    with pytest.raises(ModelRepositoryError, match="name 'ct-phantom-organ' differs from its folder 'other'"):
        ModelRepository(repo_copy)


def test_every_model_yaml_field_documents_itself_in_the_schema():
    from serve_app.model_spec import ModelSpec

    assert properties_without_description(ModelSpec.model_json_schema()) == []


@pytest.mark.parametrize(
    "old, new, message",
    [
        pytest.param("a_max: 164", "a_max: -100", "a_max (-100.0) must be greater than a_min (-57.0)", id="window"),
        pytest.param(
            "spatial_size: [96, 96, 48]",
            "roi_size: [96, 96, 48]\n  spatial_size: [96, 96, 48]",
            "give exactly one of spatial_size and roi_size (got both)",
            id="both geometries",
        ),
        pytest.param(
            "  spatial_size: [96, 96, 48]\n",
            "",
            "give exactly one of spatial_size and roi_size (got neither)",
            id="no geometry",
        ),
        pytest.param(
            "  0: background\n", "", "labels must name label 0 (background); got labels [1]", id="no background"
        ),
        pytest.param(
            "format: monai_state_dict",
            "format: monai_state_dict\nengine: {batch_sizes: [4, 2]}",
            "batch_sizes (4, 2) must be increasing positive integers",
            id="batch sizes",
        ),
        pytest.param(
            "format: monai_state_dict",
            "format: monai_state_dict\nengine: {backend: onnxruntime, precision: int8}",
            "precision int8 needs backend tensorrt (got onnxruntime)",
            id="int8 without tensorrt",
        ),
        pytest.param(
            'code: {value: "78961009", scheme: SCT, meaning: Spleen}',
            'code: {value: "78961009", scheme: SCT}',
            "labels.1.code.meaning: Field required",
            id="code without meaning",
        ),
        pytest.param(
            "format: monai_state_dict",
            "format: monai_state_dict\ninference: {overlap: 1.0}",
            "inference.overlap: Input should be less than 1",
            id="overlap of a whole window",
        ),
    ],
)
def test_model_yaml_messages_carry_the_bad_values(repo_copy, old, new, message):
    yaml_path = repo_copy / "ct-phantom-organ" / "model.yaml"
    assert old in yaml_path.read_text()
    yaml_path.write_text(yaml_path.read_text().replace(old, new))
    with pytest.raises(ModelRepositoryError) as error:
        ModelRepository(repo_copy)
    assert message in str(error.value)


def test_a_label_is_a_bare_name_or_a_name_with_codes():
    bare = LabelSpec.model_validate("organ")
    assert bare == LabelSpec(name="organ") and bare.category == ANATOMICAL_STRUCTURE
    assert bare.property_type == ANATOMICAL_STRUCTURE  # no code of its own: its category stands in
    tumour = CodeSpec(value="108369006", scheme="SCT", meaning="Tumor")
    abnormal = {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically Abnormal Structure"}
    coded = LabelSpec.model_validate({"name": "lesion", "code": tumour.model_dump(), "category": abnormal})
    assert coded.property_type == tumour and coded.category.value == "49755003"


def test_sliding_window_settings_default_to_monai_usual_ones():
    spec = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("ct-phantom-organ")
    assert (spec.inference.sw_batch_size, spec.inference.overlap) == (4, 0.25)


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"sw_batch_size": 1}, id="one window at a time"),
        pytest.param({"overlap": 0.0}, id="windows that only touch"),
        pytest.param({"overlap": 0.9}, id="large overlap"),
    ],
)
def test_sliding_window_settings_within_bounds_are_taken(settings):
    assert InferenceSpec(**settings).model_dump().items() >= settings.items()


@pytest.mark.parametrize(
    "settings, field",
    [
        pytest.param({"sw_batch_size": 0}, "sw_batch_size", id="no windows at a time"),
        pytest.param({"overlap": -0.1}, "overlap", id="negative overlap"),
        pytest.param({"overlap": 1.0}, "overlap", id="overlap of a whole window"),
    ],
)
def test_sliding_window_settings_out_of_bounds_are_refused(settings, field):
    with pytest.raises(ValidationError) as error:
        InferenceSpec(**settings)
    assert [e["loc"] for e in error.value.errors()] == [(field,)]
