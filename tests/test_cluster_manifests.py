"""`medserve cluster render`: the KubeRay RayService, the Ray cluster-launcher file and the Serve config, all written
from one AppConfig. No Kubernetes cluster, KubeRay operator or SSH-reachable nodes can run here, so the manifests are
checked with every schema that can: Serve's own (``ServeDeploySchema``), Kubernetes' (kubernetes-validate, for the
version below), Ray's cluster-launcher schema; and the RayService against the KubeRay ``ray.io/v1`` field names it
relies on. The files in cluster/ must be what cluster/example-config.yaml renders to.

What a hospital's security review asks of them is checked too: every Ray process authenticates with Ray's token
from a Secret; the dashboard is off loopback only where KubeRay's operator must reach it, and then only for it; a
NetworkPolicy admits only the API's port from outside; pods run non-root without privileges; no secret is on a
command line; the rendered files are 0600; and an open server (no tenants) is not rendered at all."""

import json
import re
import stat
from pathlib import Path

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.cli import main
from serve_app.config import ConfigError, load_config
from serve_app.manifests import MANIFEST_FILES, render_manifests

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FOLDER = ROOT / "cluster"
# As `medserve cluster render --config cluster/example-config.yaml --out cluster` names it, from the checkout's root.
EXAMPLE_CONFIG = Path("cluster") / "example-config.yaml"
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
    "spec.rayClusterConfig.authOptions",
    "spec.rayClusterConfig.authOptions.mode",
    "spec.rayClusterConfig.authOptions.secretName",
    "spec.rayClusterConfig.enableInTreeAutoscaling",
    "spec.rayClusterConfig.autoscalerOptions",
    "spec.rayClusterConfig.autoscalerOptions.upscalingMode",
    "spec.rayClusterConfig.autoscalerOptions.idleTimeoutSeconds",
    "spec.rayClusterConfig.autoscalerOptions.securityContext",
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
OPAQUE = ("template", "rayStartParams", "redisPassword", "labels", "securityContext")


def documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def objects_of(files: dict[str, str]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in documents(files["rayservice.yaml"])}


def pod_templates(files: dict[str, str]) -> list[dict]:
    cluster = objects_of(files)["RayService"]["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]


def pod_template_object(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def rule_ports(rule: dict) -> set:
    """The ports a NetworkPolicy ingress rule admits (empty: every port)."""
    return {port["port"] for port in rule.get("ports", [])}


TENANT = {
    "name": "St Mary's",
    "api_key_hashes": ["sha256:" + "ab" * 32],
    "models": ["*"],
    "rate": {"per_second": 2, "burst": 10},
    "max_concurrent": 4,
}


@pytest.fixture
def configured(tmp_path) -> Path:
    """A hospital's config: a tenant, its own models' resources, a PACS with a token, a bigger GPU group."""
    path = tmp_path / "hospital.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "medserve-stmarys",
                "http": {"allowed_hosts": ["medserve.stmarys.example"]},
                "tenants": {"st-marys": TENANT},
                "deployments": {"model": {"num_gpus": 0.25, "num_replicas": 4}},
                "pacs": {
                    "main": {
                        "url": "https://pacs.example.org/dicom-web",
                        "bearer_token": "s3cr3t-token",
                        "tenants": ["st-marys"],
                    }
                },
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


def test_the_cluster_folder_holds_what_the_example_config_renders_to():
    for name, text in render_manifests(load_config(ROOT / EXAMPLE_CONFIG), EXAMPLE_CONFIG).items():
        path = CLUSTER_FOLDER / name
        assert path.is_file() and path.read_text() == text, (
            f"cluster/{name} is not what `medserve cluster render --config {EXAMPLE_CONFIG} --out cluster` writes "
            "now: run it from the checkout's root and commit the result"
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
    # The schema really checks: a port that is no number fails.
    with pytest.raises(pydantic.ValidationError, match="port"):
        ServeDeploySchema.model_validate({**yaml.safe_load(embedded), "http_options": {"port": "eighty"}})


def test_kubernetes_objects_pass_kubernetes_schema(configured):
    objects = objects_of(render_manifests(load_config(configured), configured))
    for kind in ("Secret", "PersistentVolumeClaim", "NetworkPolicy"):
        kubernetes_validate.validate(objects[kind], KUBERNETES_VERSION, strict=True)
    templates = pod_templates(render_manifests(load_config(configured), configured))
    for template in templates:
        kubernetes_validate.validate(pod_template_object(template), KUBERNETES_VERSION, strict=True)
    # The autoscaler's container, which KubeRay adds to the head pod, takes this securityContext.
    autoscaler = objects["RayService"]["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    sidecar = json.loads(json.dumps(templates[0]))
    sidecar["spec"]["containers"][0]["securityContext"] = autoscaler
    kubernetes_validate.validate(pod_template_object(sidecar), KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(templates[0]))
    broken["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["four"]
    with pytest.raises(kubernetes_validate.ValidationError):  # the schema really checks
        kubernetes_validate.validate(pod_template_object(broken), KUBERNETES_VERSION, strict=True)
    policy = objects["NetworkPolicy"]
    with pytest.raises(kubernetes_validate.ValidationError):  # NetworkPolicy's too
        kubernetes_validate.validate(
            {**policy, "spec": {**policy["spec"], "policyTypes": "Ingress"}}, KUBERNETES_VERSION, strict=True
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


def test_every_ray_container_takes_rays_token_from_a_secret(configured):
    files = render_manifests(load_config(configured), configured)
    reference = {"secretKeyRef": {"name": "medserve-ray-token", "key": "auth_token"}}
    for template in pod_templates(files):
        for container in template["spec"]["containers"]:
            environment = {variable["name"]: variable for variable in container["env"]}
            assert environment["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}
            assert environment["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "valueFrom": reference}
    # KubeRay's operator sends the token to the dashboard, and gives it to the containers it adds, only from here.
    cluster = objects_of(files)["RayService"]["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "medserve-ray-token"}
    assert "medserve-ray-token" not in {obj["metadata"]["name"] for obj in objects_of(files).values()}


def test_the_dashboard_is_off_loopback_only_where_kuberays_operator_needs_it(configured):
    files = render_manifests(load_config(configured), configured)
    launcher = yaml.safe_load(files["cluster-launcher.yaml"])
    (head_start,) = [command for command in launcher["head_start_ray_commands"] if "ray start" in command]
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in files["cluster-launcher.yaml"]
    objects = objects_of(files)
    head = objects["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]
    # Only the head's own rayStartParams put it on the pod network, for the operator ...
    hosts = re.findall(r"dashboard-host\W+(\S+)", "\n".join(files.values()))
    assert sorted(hosts) == ["0.0.0.0", "127.0.0.1"] and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    # ... and only the operator's pods (and the cluster's own) may reach it.
    outside = [rule for rule in objects["NetworkPolicy"]["spec"]["ingress"] if 8265 in rule_ports(rule)]
    assert [rule["from"] for rule in outside] == [
        [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}},
            }
        ]
    ]
    # The head Service has the head container's ports: not the Ray Client server's.
    ports = {port["containerPort"] for port in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {6379, 8265, 8000, 8080}


def test_the_network_policy_admits_only_the_api_port_from_outside_the_cluster(tmp_path, configured):
    changed = tmp_path / "port.yaml"
    tree = yaml.safe_load(configured.read_text())
    changed.write_text(yaml.safe_dump({**tree, "http": {"port": 8443}}))
    files = render_manifests(load_config(changed), changed)
    policy = objects_of(files)["NetworkPolicy"]
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    labels = policy["spec"]["podSelector"]["matchLabels"]
    for template in pod_templates(files):  # it selects every pod of the cluster
        assert labels.items() <= template["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    from_anywhere = set()
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from")
        if peers == [{"podSelector": {"matchLabels": labels}}]:
            continue  # the cluster's own pods, of its namespace: every port (Ray's)
        if peers is None:
            from_anywhere |= rule_ports(rule)
        else:
            assert rule_ports(rule) == {8265}, rule  # the operator's, above
    assert from_anywhere == {8443}
    # Prometheus, when a namespace is named for it: Ray's metrics port and nothing else.
    tree["cluster"]["metrics_scrape_namespace"] = "monitoring"
    changed.write_text(yaml.safe_dump(tree))
    rules = objects_of(render_manifests(load_config(changed), changed))["NetworkPolicy"]["spec"]["ingress"]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert [rule_ports(rule) for rule in rules if rule.get("from") == [monitoring]] == [{8080}]


def test_pods_run_as_rays_user_without_privileges(configured):
    files = render_manifests(load_config(configured), configured)
    autoscaler = objects_of(files)["RayService"]["spec"]["rayClusterConfig"]["autoscalerOptions"]
    for template in pod_templates(files):
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000 and pod["fsGroup"] == 100
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for context in [container["securityContext"] for container in template["spec"]["containers"]]:
            assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
            assert "privileged" not in context and "readOnlyRootFilesystem" not in context  # Ray writes /tmp/ray
        assert autoscaler["securityContext"] == template["spec"]["containers"][0]["securityContext"]


def test_no_secret_is_on_a_command_line_of_the_launcher(configured):
    files = render_manifests(load_config(configured), configured)
    launcher = yaml.safe_load(files["cluster-launcher.yaml"])
    commands = [*launcher["head_start_ray_commands"], *launcher["worker_start_ray_commands"]]
    starts = [command for command in commands if "ray start" in command]
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=/etc/medserve/ray-auth-token" in command
        assert "RAY_AUTH_TOKEN=" not in command
    # Redis's password: read from the node's private file as Ray starts (Ray takes it no other way).
    assert " ".join(commands).count("--redis-password") == 1
    assert '--redis-password="$(cat /etc/medserve/redis-password)"' in starts[0]
    mounts = launcher["file_mounts"]
    assert mounts["/etc/medserve/ray-auth-token"] == "./ray-auth-token"
    assert mounts["/etc/medserve/redis-password"] == "./redis-password"
    private = {"/etc/medserve/ray-auth-token", "/etc/medserve/redis-password", "/etc/medserve/medserve.yaml"}
    for node_commands in (launcher["head_start_ray_commands"], launcher["worker_start_ray_commands"]):
        (chmod,) = [command for command in node_commands if command.startswith("chmod 600 ")]
        (start,) = [command for command in node_commands if "ray start" in command]
        assert private <= set(chmod.split()) and node_commands.index(chmod) < node_commands.index(start)
    assert "s3cr3t-token" not in files["cluster-launcher.yaml"] + files["serve_config.yaml"]


def test_render_refuses_an_open_server(tmp_path, capsys):
    assert main(["cluster", "render", "--out", str(tmp_path / "out")]) == 2  # the packaged config: no tenants
    (line,) = capsys.readouterr().err.splitlines()
    assert "http.allow_open: true" in line and "no tenants" in line and "0.0.0.0" in line
    assert not (tmp_path / "out").exists()
    loopback = tmp_path / "loopback.yaml"
    loopback.write_text("http: {host: 127.0.0.1}\n")  # the pods listen on 0.0.0.0 all the same
    assert main(["cluster", "render", "--config", str(loopback), "--out", str(tmp_path / "out")]) == 2
    capsys.readouterr()
    accepted = tmp_path / "open.yaml"
    accepted.write_text("http: {allow_open: true, allowed_hosts: [medserve.example]}\n")
    assert main(["cluster", "render", "--config", str(accepted), "--out", str(tmp_path / "out")]) == 0


def test_render_asks_for_the_names_clients_use(tmp_path, configured, capsys):
    """Left to its default, the Host allow-list names only loopback names, which no client of a cluster uses."""
    config = yaml.safe_load(configured.read_text())
    del config["http"]["allowed_hosts"]
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text(yaml.safe_dump(config))
    assert main(["cluster", "render", "--config", str(unnamed), "--out", str(tmp_path / "out")]) == 2
    assert "http.allowed_hosts is not set" in capsys.readouterr().err


def test_rendered_files_are_readable_by_their_owner_only(tmp_path, configured):
    out = tmp_path / "out"
    out.mkdir()
    (out / "medserve.yaml").write_text("left by an earlier render\n")
    (out / "medserve.yaml").chmod(0o644)
    assert main(["cluster", "render", "--config", str(configured), "--out", str(out)]) == 0
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert modes == dict.fromkeys(MANIFEST_FILES, 0o600)
    assert "s3cr3t-token" in (out / "medserve.yaml").read_text()
