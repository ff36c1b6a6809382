"""A KubeRay ``RayService`` (API ``ray.io/v1``) for medserve, with the objects it needs: the Secret that holds the
application's YAML, the PersistentVolumeClaim of the shared volume and the NetworkPolicy of its pods.

KubeRay's operator turns the RayService into a Ray cluster (a head pod and an autoscaled GPU worker group), deploys
``serveConfigV2`` on it with Serve, and routes its Service to the pods whose Serve ingress is ready; with
``gcsFaultToleranceOptions`` the head's GCS keeps its state in Redis, so a restarted head takes the cluster back.

Every Ray process authenticates with Ray's token (``RAY_AUTH_MODE=token``), read from the Secret
``cluster.ray_auth_token_secret``; only the API's port (and the DICOM node's) is open to other namespaces; pods run
as Ray's image user, without privileges.

With ``grpc.enabled``, every pod's container exposes the gRPC port of Serve's ingress (the Open Inference Protocol's
gRPC service), the NetworkPolicy opens it as it does the API's, and a Service ``<name>-grpc`` routes to the pods
whose Serve ingress is ready (KubeRay's ``ray.io/serve`` label), as KubeRay's own serve Service does for HTTP.

With a ``dicom_network`` section, the DICOM node's one replica is pinned to the head pod (a resource only the head
has), whose container exposes the DICOM port, and a Service ``<name>-dicom`` of type LoadBalancer takes a PACS's
associations to it: the head is the pod that stays (with ``gcsFaultToleranceOptions`` it is restarted in place).
"""

from __future__ import annotations

import json

import ray
import yaml

from serve_app.config import AppConfig, NodeGroupConfig
from serve_app.manifests.serve_config import (
    APP_CONFIG_PATH,
    DICOM_NODE_RESOURCE,
    SHARED_ROOT,
    app_config_yaml,
    serve_config,
)

__all__ = ["kuberay_manifests"]

_METRICS_PORT = 8080  # Ray's metrics export port in KubeRay's pods, which Prometheus scrapes
_GCS_PORT = 6379
_DASHBOARD_PORT = 8265
_TOKEN_KEY = "auth_token"  # the key KubeRay's operator reads the token from (authOptions.secretName)
# The user and group of Ray's images (rayproject/ray): medserve's image is built on them.
_RAY_USER, _RAY_GROUP = 1000, 100
_CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": _RAY_USER,
    "runAsGroup": _RAY_GROUP,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    # Not readOnlyRootFilesystem: Ray writes its sessions, logs and sockets under /tmp/ray, and pip's and Ray's
    # caches under the user's home, on the container's own filesystem.
}
_KUBERAY_OPERATOR = {"app.kubernetes.io/component": "kuberay-operator"}  # its pods' label, Helm chart or kustomize


def kuberay_manifests(config: AppConfig) -> list[dict]:
    """The Secret, the PersistentVolumeClaim, the NetworkPolicy and the RayService (and, with a DICOM node, its
    Service), in the order ``kubectl apply`` wants them. The Secret of Ray's token
    (``cluster.ray_auth_token_secret``) is not among them: it is made once in the namespace, never written into a
    file."""
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
    serve_port = config.http.port
    # The head Service KubeRay makes has the head container's ports: the GCS (workers join through it), the
    # dashboard (the operator deploys the Serve config through it) and the API. Not the Ray Client server's 10001.
    head_ports = {"gcs-server": _GCS_PORT, "dashboard": _DASHBOARD_PORT, "serve": serve_port, "metrics": _METRICS_PORT}
    worker_ports = {"serve": serve_port, "metrics": _METRICS_PORT}
    if config.grpc.enabled:
        head_ports["grpc"] = worker_ports["grpc"] = config.grpc.port
    head_start = {"num-cpus": "0", "dashboard-host": "0.0.0.0"}
    if config.dicom_network is not None:
        head_ports["dicom"] = config.dicom_network.port
        head_start["resources"] = json.dumps({DICOM_NODE_RESOURCE: 1})
    ray_cluster = {
        "rayVersion": ray.__version__,
        # KubeRay sends the token to the dashboard only when it knows it from here; it also gives the containers
        # it adds (the autoscaler, the workers' wait for the GCS) RAY_AUTH_MODE and the token.
        "authOptions": {"mode": "token", "secretName": cluster.ray_auth_token_secret},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": 300,
            "securityContext": _CONTAINER_SECURITY,
        },
        "headGroupSpec": {
            # No tasks or replicas on the head: it keeps the GCS, Serve's controller and an ingress. The dashboard
            # listens on the pod's network, not loopback: KubeRay's operator deploys serveConfigV2 and reads Serve's
            # status through it (port 8265 of the head Service). The token guards it, and the NetworkPolicy lets
            # only the operator and the cluster's own pods reach it.
            "rayStartParams": head_start,
            "template": _pod_template(config, "ray-head", cluster.head, head_ports, secret_name),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu",
                "replicas": cluster.gpu_workers.min_nodes,
                "minReplicas": cluster.gpu_workers.min_nodes,
                "maxReplicas": cluster.gpu_workers.max_nodes,
                "rayStartParams": {},
                "template": _pod_template(config, "ray-worker", cluster.gpu_workers, worker_ports, secret_name),
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
            "serveConfigV2": yaml.safe_dump(
                serve_config(config, str(APP_CONFIG_PATH), dicom_node_on_head=True), sort_keys=False
            ),
            "rayClusterConfig": ray_cluster,
        },
    }
    dicom = [_dicom_service(config)] if config.dicom_network is not None else []
    grpc = [_grpc_service(config)] if config.grpc.enabled else []
    return [secret, claim, _network_policy(config), service, *dicom, *grpc]


def _grpc_service(config: AppConfig) -> dict:
    """The gRPC service's Service: its port on every pod whose Serve ingress is ready (KubeRay labels them
    ``ray.io/serve: "true"``), inside the cluster; expose it further as the API's serve Service is."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{config.name}-grpc", "labels": _labels(config)},
        "spec": {
            "selector": {**_labels(config), "ray.io/serve": "true"},
            "ports": [{"name": "grpc", "protocol": "TCP", "port": config.grpc.port, "targetPort": "grpc"}],
        },
    }


def _dicom_service(config: AppConfig) -> dict:
    """The DICOM node's Service: its port on the head pod, where the node's replica runs, to PACS outside the
    cluster (LoadBalancer: a hospital's PACS is not a pod). Association control by AE title and address is the
    node's own (``dicom_network.ae_titles``)."""
    port = config.dicom_network.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{config.name}-dicom", "labels": _labels(config)},
        "spec": {
            "type": "LoadBalancer",
            "selector": {**_labels(config), "ray.io/node-type": "head"},
            "ports": [{"name": "dicom", "protocol": "TCP", "port": port, "targetPort": "dicom"}],
        },
    }


def _network_policy(config: AppConfig) -> dict:
    """Ingress to the cluster's pods: the API's ports (HTTP, and gRPC where enabled) and the DICOM node's from
    anywhere; every port (Ray's GCS, raylets, object transfers, workers) only from the cluster's own pods; the
    dashboard from KubeRay's operator; metrics from ``cluster.metrics_scrape_namespace``. Pods are selected by the
    labels of medserve's pod templates, which every RayCluster of the RayService keeps (KubeRay's ``ray.io/cluster``
    label changes with each new cluster)."""
    cluster = config.cluster
    own_pods = {"matchLabels": _labels(config)}
    public_ports = [config.http.port] + ([config.grpc.port] if config.grpc.enabled else [])
    public_ports += [config.dicom_network.port] if config.dicom_network is not None else []
    rules = [
        {"ports": [{"protocol": "TCP", "port": port} for port in public_ports]},
        {"from": [{"podSelector": own_pods}]},
        {
            "from": [
                {
                    "namespaceSelector": {"matchLabels": _namespace(cluster.kuberay_operator_namespace)},
                    "podSelector": {"matchLabels": _KUBERAY_OPERATOR},
                }
            ],
            "ports": [{"protocol": "TCP", "port": _DASHBOARD_PORT}],
        },
    ]
    if cluster.metrics_scrape_namespace:
        rules.append(
            {
                "from": [{"namespaceSelector": {"matchLabels": _namespace(cluster.metrics_scrape_namespace)}}],
                "ports": [{"protocol": "TCP", "port": _METRICS_PORT}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{config.name}-ray", "labels": _labels(config)},
        "spec": {"podSelector": own_pods, "policyTypes": ["Ingress"], "ingress": rules},
    }


def _pod_template(config: AppConfig, name: str, node: NodeGroupConfig, ports: dict[str, int], secret: str) -> dict:
    """A Ray node's pod: medserve's image, the node's resources (its GPUs as ``nvidia.com/gpu``), the shared volume
    at ``storage.root``, the application's YAML, Ray's token, the ingress mode Ray starts with, probes, scrape
    annotations, and no privileges."""
    resources = {"cpu": str(node.cpus), "memory": node.memory}
    if node.gpus:
        resources["nvidia.com/gpu"] = str(node.gpus)
    token = {"secretKeyRef": {"name": config.cluster.ray_auth_token_secret, "key": _TOKEN_KEY}}
    environment = [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": token},
        *({"name": key, "value": value} for key, value in config.http.ray_environment().items()),
    ]
    container = {
        "name": name,
        "image": config.cluster.image,
        "env": environment,
        "ports": [{"name": port_name, "containerPort": port} for port_name, port in ports.items()],
        "resources": {"requests": resources, "limits": resources},
        "securityContext": _CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "shared", "mountPath": str(SHARED_ROOT)},
            {"name": "app-config", "mountPath": str(APP_CONFIG_PATH.parent), "readOnly": True},
        ],
        # Ready once this node's Serve ingress answers (Serve's and HAProxy's health route); alive while its raylet
        # is. Ray answers both health routes without the token.
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
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": _RAY_USER,
                "runAsGroup": _RAY_GROUP,
                "fsGroup": _RAY_GROUP,
                # Only when the volume's root is not already the group's: no walk over a shared volume of
                # results at every start.
                "fsGroupChangePolicy": "OnRootMismatch",
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [
                {"name": "shared", "persistentVolumeClaim": {"claimName": config.cluster.shared_volume_claim}},
                {"name": "app-config", "secret": {"secretName": secret}},
            ],
        },
    }


def _labels(config: AppConfig) -> dict[str, str]:
    return {"app.kubernetes.io/name": "medserve", "app.kubernetes.io/instance": config.name}


def _namespace(name: str) -> dict[str, str]:
    # Every namespace carries its own name in this label (Kubernetes >= 1.22).
    return {"kubernetes.io/metadata.name": name}
