"""Serve's config file for medserve, and the application's own YAML as the pods of a cluster read it."""

from __future__ import annotations

import ipaddress
from pathlib import Path, PurePosixPath

import yaml
from pydantic import SecretStr

from serve_app.config import AppConfig, ConfigError
from serve_app.dicom_network.deliveries import DICOM_NODE

__all__ = [
    "APP_CONFIG_PATH",
    "DICOM_NODE_RESOURCE",
    "SERVE_CONFIG_PATH",
    "SHARED_ROOT",
    "app_config_yaml",
    "cluster_app_config",
    "serve_config",
]

# Where a cluster's pods find the application's YAML (a Secret: it may hold PACS credentials), and mount the shared
# volume that holds uploads, results and WSI outputs.
APP_CONFIG_PATH = PurePosixPath("/etc/medserve/medserve.yaml")
SERVE_CONFIG_PATH = APP_CONFIG_PATH.with_name("serve_config.yaml")  # where the cluster launcher copies it
SHARED_ROOT = PurePosixPath("/mnt/medserve")
# A resource only the node that exposes the DICOM port has (a KubeRay head pod): the DICOM node's replica needs it.
DICOM_NODE_RESOURCE = "medserve_dicom_port"


def serve_config(config: AppConfig, app_config_path: str | None, dicom_node_on_head: bool = False) -> dict:
    """Serve's config file (``ServeDeploySchema``): medserve's application, built by ``app_builder`` from the YAML at
    ``app_config_path`` (None: ``$MEDSERVE_CONFIG`` where Ray started, else the packaged default). Replicas and
    resources come from that YAML; with ``dicom_node_on_head`` (and a ``dicom_network`` section), the DICOM node's
    replica asks for ``DICOM_NODE_RESOURCE``, which only the node exposing the DICOM port has."""
    application = {
        "name": config.name,
        "route_prefix": "/",
        "import_path": "serve_app.app:app_builder",
        "args": {"config": app_config_path},
    }
    if dicom_node_on_head and config.dicom_network is not None:
        options = {"num_cpus": 0, "resources": {DICOM_NODE_RESOURCE: 1}}
        application["deployments"] = [{"name": DICOM_NODE, "ray_actor_options": options}]
    return {
        "proxy_location": config.http.proxy_location,
        "http_options": {"host": "0.0.0.0", "port": config.http.port},
        **config.grpc.serve_start_options(),  # Serve's gRPC options, where the gRPC service is enabled
        "applications": [application],
    }


def cluster_app_config(config: AppConfig) -> dict:
    """``config`` as a cluster's pods read it: its fields that differ from the defaults (secrets in clear: it is
    written into a Kubernetes Secret), listening on every interface, storage on the shared volume.

    Raises ``ConfigError`` when ``storage.uploads_root`` is set: on several nodes uploads must be on the shared
    volume too, where they go by default; and when ``dicom_network.port`` is 0 (any free port).
    """
    if config.storage.uploads_root is not None:
        raise ConfigError(
            f"storage.uploads_root is {config.storage.uploads_root}: on a cluster the ingress and the replicas that "
            "read an upload may be on different nodes; leave it unset (uploads then go to the shared volume)"
        )
    if config.dicom_network is not None and config.dicom_network.port == 0:
        raise ConfigError(
            "dicom_network.port is 0 (any free port): a PACS must be configured with the DICOM node's port, and a "
            "cluster's Service forwards a fixed one; set it (e.g. 11112)"
        )
    tree = _plain(config.model_dump(exclude_defaults=True, exclude={"cluster"}))
    tree.setdefault("http", {})["host"] = "0.0.0.0"
    tree.setdefault("storage", {})["root"] = str(SHARED_ROOT)
    if config.dicom_network is not None:  # the head pod's port, which its Service forwards to
        tree["dicom_network"]["host"] = "0.0.0.0"
    if config.wsi.output_root == config.storage.root / "wsi":  # its default: under the storage root, so shared too
        tree.setdefault("wsi", {})["output_root"] = str(SHARED_ROOT / "wsi")
    return tree


def app_config_yaml(config: AppConfig) -> str:
    return yaml.safe_dump(cluster_app_config(config), sort_keys=False)


def _plain(value):
    """``value`` with secrets revealed, paths and networks (a DICOM caller's) as strings: what YAML can hold."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value
