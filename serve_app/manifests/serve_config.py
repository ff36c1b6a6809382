"""Serve's config file for medserve, and the application's own YAML as the pods of a cluster read it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import yaml
from pydantic import SecretStr

from serve_app.config import AppConfig, ConfigError

__all__ = [
    "APP_CONFIG_PATH",
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


def serve_config(config: AppConfig, app_config_path: str | None) -> dict:
    """Serve's config file (``ServeDeploySchema``): medserve's application, built by ``app_builder`` from the YAML at
    ``app_config_path`` (None: ``$MEDSERVE_CONFIG`` where Ray started, else the packaged default). Replicas and
    resources come from that YAML."""
    return {
        "proxy_location": config.http.proxy_location,
        "http_options": {"host": "0.0.0.0", "port": config.http.port},
        "applications": [
            {
                "name": config.name,
                "route_prefix": "/",
                "import_path": "serve_app.app:app_builder",
                "args": {"config": app_config_path},
            }
        ],
    }


def cluster_app_config(config: AppConfig) -> dict:
    """``config`` as a cluster's pods read it: its fields that differ from the defaults (secrets in clear: it is
    written into a Kubernetes Secret), listening on every interface, storage on the shared volume.

    Raises ``ConfigError`` when ``storage.uploads_root`` is set: on several nodes uploads must be on the shared
    volume too, where they go by default.
    """
    if config.storage.uploads_root is not None:
        raise ConfigError(
            f"storage.uploads_root is {config.storage.uploads_root}: on a cluster the ingress and the replicas that "
            "read an upload may be on different nodes; leave it unset (uploads then go to the shared volume)"
        )
    tree = _plain(config.model_dump(exclude_defaults=True, exclude={"cluster"}))
    tree.setdefault("http", {})["host"] = "0.0.0.0"
    tree.setdefault("storage", {})["root"] = str(SHARED_ROOT)
    if config.wsi.output_root == config.storage.root / "wsi":  # its default: under the storage root, so shared too
        tree.setdefault("wsi", {})["output_root"] = str(SHARED_ROOT / "wsi")
    return tree


def app_config_yaml(config: AppConfig) -> str:
    return yaml.safe_dump(cluster_app_config(config), sort_keys=False)


def _plain(value):
    """``value`` with secrets revealed and paths as strings: what YAML can hold."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    return value
