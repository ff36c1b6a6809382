"""Every manifest of a config, as the files ``medserve cluster render`` writes."""

from __future__ import annotations

from pathlib import Path

import yaml

from serve_app.config import AppConfig
from serve_app.manifests.cluster_launcher import cluster_launcher
from serve_app.manifests.kuberay import kuberay_manifests
from serve_app.manifests.serve_config import app_config_yaml, serve_config

__all__ = ["MANIFEST_FILES", "render_manifests"]

MANIFEST_FILES = ("serve_config.yaml", "rayservice.yaml", "cluster-launcher.yaml", "medserve.yaml")
_HEADER = "# Written by `medserve cluster render{options}` from {source}: edit that, not this.\n"
_USAGE = {
    "serve_config.yaml": "# serve run serve_config.yaml (a local Ray), or serve deploy serve_config.yaml (a running\n"
    "# cluster); every node needs medserve installed. config null: the YAML $MEDSERVE_CONFIG names, else the\n"
    "# packaged one.\n",
    "rayservice.yaml": "# kubectl apply -f rayservice.yaml  (KubeRay operator >= 1.3; Redis and its password\n"
    "# Secret for the GCS's fault tolerance, an image with medserve installed: README, Running on a cluster)\n",
    "cluster-launcher.yaml": "# ray up cluster-launcher.yaml, then\n"
    "# ray exec cluster-launcher.yaml 'serve deploy /etc/medserve/serve_config.yaml'\n",
    "medserve.yaml": "# The application's YAML as the cluster's nodes read it: keep it out of version control\n"
    "# when it holds PACS credentials.\n",
}


def render_manifests(config: AppConfig, config_path: Path | None) -> dict[str, str]:
    """File name -> text, for each of ``MANIFEST_FILES``:

    - ``serve_config.yaml``: for ``serve deploy`` / ``serve run`` on a cluster whose nodes read ``config_path``;
    - ``rayservice.yaml``: the KubeRay RayService with its Secret and PersistentVolumeClaim;
    - ``cluster-launcher.yaml``: for ``ray up`` on on-premises nodes, which copies ``medserve.yaml`` and
      ``serve_config.yaml`` to them;
    - ``medserve.yaml``: the application's YAML as the cluster's nodes read it (it may hold PACS credentials).
    """
    source = str(config_path) if config_path else "the packaged default config"
    header = _HEADER.format(options=f" --config {config_path}" if config_path else "", source=source)
    documents = {
        "serve_config.yaml": [serve_config(config, str(config_path) if config_path else None)],
        "rayservice.yaml": kuberay_manifests(config),
        "cluster-launcher.yaml": [cluster_launcher(config)],
    }
    texts = {name: yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False) for name, docs in documents.items()}
    texts["medserve.yaml"] = app_config_yaml(config)
    return {name: header + _USAGE[name] + text for name, text in texts.items()}


class _Dumper(yaml.SafeDumper):
    """YAML for people: no anchors and aliases, text of several lines (an embedded config) as a literal block."""

    def ignore_aliases(self, data) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _text)
