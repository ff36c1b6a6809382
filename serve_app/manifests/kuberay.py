"""A KubeRay ``RayService`` (API ``ray.io/v1``) for medserve, with the two objects it needs: the Secret that holds
the application's YAML and the PersistentVolumeClaim of the shared volume.

KubeRay's operator turns the RayService into a Ray cluster (a head pod and an autoscaled GPU worker group), deploys
``serveConfigV2`` on it with Serve, and routes its Service to the pods whose Serve ingress is ready; with
``gcsFaultToleranceOptions`` the head's GCS keeps its state in Redis, so a restarted head takes the cluster back.
"""

from __future__ import annotations

import ray
import yaml

from serve_app.config import AppConfig, NodeGroupConfig
from serve_app.manifests.serve_config import APP_CONFIG_PATH, SHARED_ROOT, app_config_yaml, serve_config

__all__ = ["kuberay_manifests"]

_METRICS_PORT = 8080  # Ray's metrics export port in KubeRay's pods, which Prometheus scrapes
_HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": _METRICS_PORT}
_WORKER_PORTS = {"serve": 8000, "metrics": _METRICS_PORT}


def kuberay_manifests(config: AppConfig) -> list[dict]:
    """The Secret, the PersistentVolumeClaim and the RayService, in the order ``kubectl apply`` wants them."""
    cluster = config.cluster
    secret_name = f"{config.name}-config"
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret_name, "labels": _labels(config)},
        "type": "Opaque",
        "stringData": {APP_CONFIG_PATH.name: app_config_yaml(config)},
    }
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": cluster.shared_volume_claim, "labels": _labels(config)},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": cluster.shared_volume_size}},
            **({"storageClassName": cluster.storage_class} if cluster.storage_class else {}),
        },
    }
    ray_cluster = {
        "rayVersion": ray.__version__,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
        "headGroupSpec": {
            # No tasks or replicas on the head: it keeps the GCS, Serve's controller and an ingress.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod_template(config, "ray-head", cluster.head, _HEAD_PORTS, secret_name),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu",
                "replicas": cluster.gpu_workers.min_nodes,
                "minReplicas": cluster.gpu_workers.min_nodes,
                "maxReplicas": cluster.gpu_workers.max_nodes,
                "rayStartParams": {},
                "template": _pod_template(config, "ray-worker", cluster.gpu_workers, _WORKER_PORTS, secret_name),
            }
        ],
    }
    if cluster.redis_address:
        fault_tolerance = {"redisAddress": cluster.redis_address}
        if cluster.redis_password_secret:
            reference = {"name": cluster.redis_password_secret, "key": "password"}
            fault_tolerance["redisPassword"] = {"valueFrom": {"secretKeyRef": reference}}
        ray_cluster["gcsFaultToleranceOptions"] = fault_tolerance
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": config.name, "labels": _labels(config)},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(config, str(APP_CONFIG_PATH)), sort_keys=False),
            "rayClusterConfig": ray_cluster,
        },
    }
    return [secret, claim, service]


def _pod_template(config: AppConfig, name: str, node: NodeGroupConfig, ports: dict[str, int], secret: str) -> dict:
    """A Ray node's pod: medserve's image, the node's resources (its GPUs as ``nvidia.com/gpu``), the shared volume
    at ``storage.root``, the application's YAML, the ingress mode Ray starts with, probes and scrape annotations."""
    resources = {"cpu": str(node.cpus), "memory": node.memory}
    if node.gpus:
        resources["nvidia.com/gpu"] = str(node.gpus)
    environment = [{"name": key, "value": value} for key, value in config.http.ray_environment().items()]
    container = {
        "name": name,
        "image": config.cluster.image,
        "env": environment,
        "ports": [{"name": port_name, "containerPort": port} for port_name, port in ports.items()],
        "resources": {"requests": resources, "limits": resources},
        "volumeMounts": [
            {"name": "shared", "mountPath": str(SHARED_ROOT)},
            {"name": "app-config", "mountPath": str(APP_CONFIG_PATH.parent), "readOnly": True},
        ],
        # Ready once this node's Serve ingress answers (Serve's and HAProxy's health route); alive while its raylet is.
        "readinessProbe": {
            "httpGet": {"path": "/-/healthz", "port": ports["serve"]},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "exec": {"command": ["bash", "-c", "wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz"]},
            "initialDelaySeconds": 30,
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
    }
    return {
        "metadata": {
            "labels": _labels(config),
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(_METRICS_PORT)},
        },
        "spec": {
            "containers": [container],
            "volumes": [
                {"name": "shared", "persistentVolumeClaim": {"claimName": config.cluster.shared_volume_claim}},
                {"name": "app-config", "secret": {"secretName": secret}},
            ],
        },
    }


def _labels(config: AppConfig) -> dict[str, str]:
    return {"app.kubernetes.io/name": "medserve", "app.kubernetes.io/instance": config.name}
