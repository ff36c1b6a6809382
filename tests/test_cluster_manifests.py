"""`medserve cluster render`: the KubeRay RayService, the Ray cluster-launcher file and the Serve config, all written
from one AppConfig. No Kubernetes cluster, KubeRay operator or SSH-reachable nodes can run here, so the manifests are
checked with every schema that can: Serve's own (``ServeDeploySchema``), Kubernetes' (kubernetes-validate, for the
version below), Ray's cluster-launcher schema; and the RayService against the KubeRay ``ray.io/v1`` field names it
relies on. The files in cluster/ must be the rendered defaults."""

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.cli import main
from serve_app.config import ConfigError, load_config
from serve_app.manifests import MANIFEST_FILES, render_manifests

CLUSTER_FOLDER = Path(__file__).resolve().parents[1] / "cluster"
KUBERNETES_VERSION = "1.33.0"
# The RayService fields this project relies on, as KubeRay's ray.io/v1 API reference names them
# (https://ray-project.github.io/kuberay/reference/api/): a renamed or misspelt one is silently ignored by the
# operator, so the rendered object may use these and no others.
KUBERAY_V1_FIELDS = {
    "apiVersion",
    "kind",
    "metadata",
    "metadata.name",
    "metadata.labels",
    "spec",
    "spec.serveConfigV2",
    "spec.rayClusterConfig",
    "spec.rayClusterConfig.rayVersion",
    "spec.rayClusterConfig.enableInTreeAutoscaling",
    "spec.rayClusterConfig.autoscalerOptions",
    "spec.rayClusterConfig.autoscalerOptions.upscalingMode",
    "spec.rayClusterConfig.autoscalerOptions.idleTimeoutSeconds",
    "spec.rayClusterConfig.gcsFaultToleranceOptions",
    "spec.rayClusterConfig.gcsFaultToleranceOptions.redisAddress",
    "spec.rayClusterConfig.gcsFaultToleranceOptions.redisPassword",
    "spec.rayClusterConfig.headGroupSpec",
    "spec.rayClusterConfig.headGroupSpec.rayStartParams",
    "spec.rayClusterConfig.headGroupSpec.template",
    "spec.rayClusterConfig.workerGroupSpecs",
    "spec.rayClusterConfig.workerGroupSpecs.groupName",
    "spec.rayClusterConfig.workerGroupSpecs.replicas",
    "spec.rayClusterConfig.workerGroupSpecs.minReplicas",
    "spec.rayClusterConfig.workerGroupSpecs.maxReplicas",
    "spec.rayClusterConfig.workerGroupSpecs.rayStartParams",
    "spec.rayClusterConfig.workerGroupSpecs.template",
}
# Below these the values are Kubernetes' own types (checked with its schema) or free-form maps.
OPAQUE = ("template", "rayStartParams", "redisPassword", "labels")


def documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def objects_of(files: dict[str, str]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in documents(files["rayservice.yaml"])}


@pytest.fixture
def configured(tmp_path) -> Path:
    """A hospital's config: its own models' resources, a PACS with a token, a bigger GPU group."""
    path = tmp_path / "hospital.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "medserve-stmarys",
                "deployments": {"model": {"num_gpus": 0.25, "num_replicas": 4}},
                "pacs": {"main": {"url": "https://pacs.example.org/dicom-web", "bearer_token": "s3cr3t-token"}},
                "gpu_sharing": "mps",
                "cluster": {
                    "image": "registry.example.org/medserve:0.1.0",
                    "gpu_workers": {"cpus": 32, "memory": "128Gi", "gpus": 2, "min_nodes": 2, "max_nodes": 6},
                    "storage_class": "nfs-client",
                },
            }
        )
    )
    return path


def test_the_cluster_folder_holds_the_rendered_defaults():
    for name, text in render_manifests(load_config(), None).items():
        path = CLUSTER_FOLDER / name
        assert path.is_file() and path.read_text() == text, (
            f"cluster/{name} is not what `medserve cluster render` writes now: run it and commit the result"
        )


def test_render_writes_every_file_from_the_given_config(tmp_path, configured, capsys):
    assert main(["cluster", "render", "--config", str(configured), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(MANIFEST_FILES)
    assert f"--config {configured}" in (tmp_path / "out" / "rayservice.yaml").read_text().splitlines()[0]


def test_serve_configs_pass_serves_own_schema(configured):
    files = render_manifests(load_config(configured), configured)
    embedded = objects_of(files)["RayService"]["spec"]["serveConfigV2"]
    for text in (files["serve_config.yaml"], embedded):
        schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
        (application,) = schema.applications
        assert application.import_path == "serve_app.app:app_builder" and application.name == "medserve-stmarys"
    assert yaml.safe_load(embedded)["applications"][0]["args"] == {"config": "/etc/medserve/medserve.yaml"}
    with pytest.raises(Exception, match="port"):  # the schema really checks: a port that is no number fails
        ServeDeploySchema.model_validate({**yaml.safe_load(embedded), "http_options": {"port": "eighty"}})


def test_kubernetes_objects_pass_kubernetes_schema(configured):
    objects = objects_of(render_manifests(load_config(configured), configured))
    for kind in ("Secret", "PersistentVolumeClaim"):
        kubernetes_validate.validate(objects[kind], KUBERNETES_VERSION, strict=True)
    cluster = objects["RayService"]["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]
    for k, template in enumerate(templates):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{k}"}, "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(templates[0]))
    broken["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["four"]
    with pytest.raises(kubernetes_validate.ValidationError):  # the schema really checks
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": broken},
            KUBERNETES_VERSION,
            strict=True,
        )


def test_rayservice_uses_only_kuberay_v1_fields(configured):
    service = objects_of(render_manifests(load_config(configured), configured))["RayService"]
    used = set()

    def walk(value, path: str) -> None:
        if path:
            used.add(path)
        if path.rsplit(".", 1)[-1] in OPAQUE:
            return
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                for key, child in item.items():
                    walk(child, f"{path}.{key}" if path else key)

    walk(service, "")
    assert {"spec.rayClusterConfig.workerGroupSpecs.maxReplicas", "spec.serveConfigV2"} <= used
    assert used <= KUBERAY_V1_FIELDS, f"fields KubeRay v1 does not document: {sorted(used - KUBERAY_V1_FIELDS)}"
    assert service["apiVersion"] == "ray.io/v1" and service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


def test_pods_get_the_nodes_resources_the_shared_volume_probes_and_scraping(configured):
    objects = objects_of(render_manifests(load_config(configured), configured))
    cluster = objects["RayService"]["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["maxReplicas"], workers["replicas"]) == (2, 6, 2)
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"] == "redis:6379"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = cluster["headGroupSpec"]["template"]
    worker = workers["template"]
    (container,) = worker["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": "32", "memory": "128Gi", "nvidia.com/gpu": "2"}
    assert "nvidia.com/gpu" not in head["spec"]["containers"][0]["resources"]["limits"]
    assert container["image"] == "registry.example.org/medserve:0.1.0"
    assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in container["env"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}
    assert "livenessProbe" in container
    assert worker["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    claim = objects["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs-client"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"shared": "/mnt/medserve", "app-config": "/etc/medserve"}


def test_the_secret_holds_the_config_the_cluster_runs_and_only_it_holds_the_token(tmp_path, configured):
    files = render_manifests(load_config(configured), configured)
    secret = objects_of(files)["Secret"]
    (tmp_path / "in-cluster.yaml").write_text(secret["stringData"]["medserve.yaml"])
    in_cluster = load_config(tmp_path / "in-cluster.yaml")
    given = load_config(configured)
    assert in_cluster.deployments == given.deployments and in_cluster.name == given.name
    assert in_cluster.pacs["main"].bearer_token.get_secret_value() == "s3cr3t-token"
    assert (str(in_cluster.storage.root), str(in_cluster.wsi.output_root)) == ("/mnt/medserve", "/mnt/medserve/wsi")
    assert in_cluster.http.host == "0.0.0.0"
    assert secret["stringData"]["medserve.yaml"] in files["medserve.yaml"]
    assert "s3cr3t-token" not in files["serve_config.yaml"] + files["cluster-launcher.yaml"]


def test_cluster_launcher_passes_rays_schema_and_starts_ray_as_configured(configured):
    launcher = yaml.safe_load(render_manifests(load_config(configured), configured)["cluster-launcher.yaml"])
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema really checks
        jsonschema.validate({**launcher, "max_workers": "two"}, schema)
    head_start, worker_start = launcher["head_start_ray_commands"][-1], " ".join(launcher["worker_start_ray_commands"])
    assert "RAY_REDIS_ADDRESS=redis:6379" in head_start and "--head" in head_start
    assert "MEDSERVE_CONFIG=/etc/medserve/medserve.yaml" in head_start and "RAY_SERVE_ENABLE_HA_PROXY=1" in worker_start
    assert "nvidia-cuda-mps-control -d" in worker_start and "--num-gpus=2" in worker_start
    assert launcher["file_mounts"]["/etc/medserve/medserve.yaml"] == "./medserve.yaml"


def test_render_refuses_what_a_cluster_cannot_run_naming_the_field(tmp_path):
    ram = tmp_path / "ram.yaml"
    ram.write_text("storage: {uploads_root: /dev/shm/medserve}\n")
    with pytest.raises(ConfigError, match="storage.uploads_root"):
        render_manifests(load_config(ram), ram)
    inverted = tmp_path / "inverted.yaml"
    inverted.write_text("cluster: {gpu_workers: {min_nodes: 5, max_nodes: 2}}\n")
    with pytest.raises(ConfigError, match=r"cluster\.gpu_workers.*min_nodes \(5\) is more than max_nodes \(2\)"):
        load_config(inverted)


def test_app_builder_reads_the_config_medserve_config_names(tmp_path, monkeypatch):
    from serve_app.app import app_builder

    bad = tmp_path / "named-by-environment.yaml"
    bad.write_text("limits: {max_upload_bytes: -1}\n")
    monkeypatch.setenv("MEDSERVE_CONFIG", str(bad))
    with pytest.raises(ConfigError, match="named-by-environment.yaml"):
        app_builder({})
