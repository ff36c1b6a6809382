from pathlib import Path

import pytest
from pydantic import Field

from helpers import properties_without_description
from serve_app.config import ConfigError, load_config
from serve_app.strict_model import StrictModel


def test_default_config_is_valid_and_serves_the_embedded_model():
    config = load_config()
    assert config.model_repository.name == "models"
    assert (config.model_repository / "ct-phantom-organ" / "model.yaml").is_file()
    assert config.deployments.model.batching.max_batch_size >= 1


def test_not_yaml_and_missing_file_say_so(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("deployments: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_fractional_gpus_and_per_model_overrides_reach_serve_options(tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text(
        "deployments:\n  model: {num_gpus: 0.25, num_replicas: 4}\n"
        "models:\n  ct-phantom-organ:\n"
        "    {num_gpus: 0.5, autoscaling: {min_replicas: 1, max_replicas: 3}, batching: {max_batch_size: 8}}\n"
    )
    config = load_config(path)
    assert config.deployments.model.serve_options()["ray_actor_options"]["num_gpus"] == 0.25
    assert config.deployments.model.serve_options()["num_replicas"] == 4
    override = config.model_deployment("ct-phantom-organ")
    options = override.serve_options()
    assert options["ray_actor_options"]["num_gpus"] == 0.5
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    assert override.batching.max_batch_size == 8


def test_relative_model_repository_is_relative_to_the_config_file(tmp_path):
    path = tmp_path / "repo.yaml"
    path.write_text("model_repository: ./my-models\n")
    assert load_config(path).model_repository == (tmp_path / "my-models").resolve()


def test_every_config_field_documents_itself_in_the_schema():
    from serve_app.config import AppConfig

    assert properties_without_description(AppConfig.model_json_schema()) == []


def test_the_schema_check_finds_an_undocumented_field_of_a_nested_section():
    class Section(StrictModel):
        documented: int = Field(1, description="Has one.")
        undocumented: int = 1

    class Root(StrictModel):
        section: Section = Field(Section(), description="A nested section, which lands in $defs.")

    assert properties_without_description(Root.model_json_schema()) == ["Section.undocumented"]


_TENANT = "{name: T, api_key_hashes: [sha256:%s], models: ['*'], rate: {per_second: 1, burst: 1}, max_concurrent: 1}"


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        pytest.param("deployments:\n  model:\n    num_gpus: -0.25\n", "  deployments.model.num_gpus: ", id="bad value"),
        pytest.param(
            "deployments:\n  preprocess:\n    num_replica: 2\n",
            "  deployments.preprocess.num_replica: ",
            id="misspelt key is rejected, not ignored",
        ),
        pytest.param(
            "deployments:\n  model:\n    autoscaling: {min_replicas: 4, max_replicas: 2}\n",
            "  deployments.model.autoscaling: Value error, max_replicas (2) must be >= min_replicas (4)",
            id="autoscaling bounds",
        ),
        pytest.param(
            "http: {ingress: nginx}\n", "  http.ingress: Input should be 'haproxy' or 'proxy'", id="unknown ingress"
        ),
        pytest.param("gpu_sharing: mig\n", "  gpu_sharing: Input should be 'time-slicing' or 'mps'", id="gpu sharing"),
        pytest.param(
            f"tenants:\n  a: {_TENANT % ('0' * 64)}\n  b: {_TENANT % ('0' * 64)}\n",
            "one API key hash is listed twice (by a, b)",
            id="one key hash for two tenants",
        ),
    ],
)
def test_a_bad_config_fails_at_start_naming_the_field_and_the_value(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)


def test_the_ingress_and_serves_data_plane_are_chosen_by_the_environment_ray_starts_with():
    # HAProxy by default, Serve's throughput-optimized data plane off (and said so, whatever the shell exports).
    default = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    assert load_config().http.ray_environment() == default
    proxy = load_config(overrides={"http.ingress": "proxy", "http.throughput_optimized": "true"})
    assert proxy.http.ray_environment() == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def test_uploads_spool_under_the_storage_root_unless_a_folder_is_named(tmp_path):
    assert load_config(overrides={"storage.root": str(tmp_path)}).storage.uploads == tmp_path / "uploads"
    ram = load_config(overrides={"storage.uploads_root": "/dev/shm/medserve"})
    assert ram.storage.uploads == Path("/dev/shm/medserve")
