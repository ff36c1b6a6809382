import shutil

import pytest

from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.errors import ModelNotFound
from serve_app.model_repository import ModelRepository, ModelRepositoryError


def test_embedded_repository_lists_the_default_model():
    repository = ModelRepository(EMBEDDED_MODEL_REPOSITORY)
    spec = repository.get("ct-phantom-organ")
    assert spec.modality == "CT" and spec.labels == {0: "background", 1: "organ"}
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
    with pytest.raises(ModelRepositoryError, match="differs from its folder"):
        ModelRepository(repo_copy)
