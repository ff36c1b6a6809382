"""The DICOM node on KubeRay, as rendered (no Kubernetes runs here): with a ``dicom_network`` section the head pod
exposes the DICOM port and has the resource that pins the node's one replica to it, the Serve config asks for that
resource, a LoadBalancer Service sends the port to the head, the NetworkPolicy admits it from outside, and the
pods' config listens on every interface. Without the section, none of it."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.config import ConfigError, load_config
from serve_app.manifests import render_manifests
from serve_app.manifests.serve_config import DICOM_NODE_RESOURCE

KUBERNETES_VERSION = "1.33.0"
DICOM_PORT = 11112
HOSPITAL = {
    "name": "medserve-stmarys",
    "http": {"allowed_hosts": ["medserve.stmarys.example"]},
    "tenants": {
        "st-marys": {
            "name": "St Mary's",
            "api_key_hashes": ["sha256:" + "ab" * 32],
            "models": ["*"],
            "rate": {"per_second": 2, "burst": 10},
            "max_concurrent": 4,
        }
    },
    "cluster": {"image": "registry.example.org/medserve:0.1.0"},
}
NODE = {
    "dicom_network": {
        "port": DICOM_PORT,
        "ae_titles": {"MEDSERVE": {"tenant": "st-marys", "callers": {"PACS": ["10.0.0.0/24"]}}},
    },
    "routes": {"organ": {"match": {"modality": ["CT"]}, "model": "ct-phantom-organ"}},
}


def _rendered(tmp_path: Path, tree: dict) -> tuple[dict[str, list[dict]], dict]:
    path = tmp_path / "hospital.yaml"
    path.write_text(yaml.safe_dump(tree))
    files = render_manifests(load_config(path), path)
    objects: dict[str, list[dict]] = {}
    for document in yaml.safe_load_all(files["rayservice.yaml"]):
        if document is not None:
            objects.setdefault(document["kind"], []).append(document)
    return objects, files


def test_a_dicom_node_is_pinned_to_the_head_whose_port_a_service_and_the_policy_open(tmp_path):
    objects, _ = _rendered(tmp_path, {**HOSPITAL, **NODE})
    (service,) = objects["Service"]
    kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"] == [{"name": "dicom", "protocol": "TCP", "port": DICOM_PORT, "targetPort": "dicom"}]
    cluster = objects["RayService"][0]["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert service["spec"]["selector"] == {**head["template"]["metadata"]["labels"], "ray.io/node-type": "head"}
    (container,) = head["template"]["spec"]["containers"]
    assert {"name": "dicom", "containerPort": DICOM_PORT} in container["ports"]
    assert json.loads(head["rayStartParams"]["resources"]) == {DICOM_NODE_RESOURCE: 1}
    for group in cluster["workerGroupSpecs"]:  # no worker has the resource, nor the port
        assert "resources" not in group["rayStartParams"]
        assert all(port["name"] != "dicom" for port in group["template"]["spec"]["containers"][0]["ports"])

    serve_config = yaml.safe_load(objects["RayService"][0]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (node,) = serve_config["applications"][0]["deployments"]
    assert node == {"name": "DicomNode", "ray_actor_options": {"num_cpus": 0, "resources": {DICOM_NODE_RESOURCE: 1}}}

    (policy,) = objects["NetworkPolicy"]
    from_anywhere = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [{p["port"] for p in rule["ports"]} for rule in from_anywhere] == [{8000, DICOM_PORT}]

    (secret,) = objects["Secret"]
    in_pods = yaml.safe_load(next(iter(secret["stringData"].values())))
    assert in_pods["dicom_network"]["host"] == "0.0.0.0"
    assert in_pods["dicom_network"]["ae_titles"]["MEDSERVE"]["callers"] == {"PACS": ["10.0.0.0/24"]}


def test_without_a_dicom_node_nothing_of_it_is_rendered(tmp_path):
    objects, files = _rendered(tmp_path, HOSPITAL)
    assert "Service" not in objects
    head = objects["RayService"][0]["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "resources" not in head["rayStartParams"]
    assert "deployments" not in yaml.safe_load(objects["RayService"][0]["spec"]["serveConfigV2"])["applications"][0]
    assert "deployments" not in yaml.safe_load(files["serve_config.yaml"])["applications"][0]


def test_a_node_on_any_free_port_is_refused_for_a_cluster_naming_the_field(tmp_path):
    tree = {**HOSPITAL, **NODE, "dicom_network": {**NODE["dicom_network"], "port": 0}}
    with pytest.raises(ConfigError, match=r"dicom_network\.port is 0"):
        _rendered(tmp_path, tree)
