"""Every manifest of a config, as the files ``medserve cluster render`` writes."""

from __future__ import annotations

from pathlib import Path

import yaml

from serve_app.config import AppConfig
from serve_app.manifests.cluster_launcher import RAY_AUTH_TOKEN_PATH, REDIS_PASSWORD_PATH, cluster_launcher
from serve_app.manifests.kuberay import kuberay_manifests
from serve_app.manifests.serve_config import SERVE_CONFIG_PATH, app_config_yaml, serve_config

__all__ = ["MANIFEST_FILES", "render_manifests"]

MANIFEST_FILES = ("serve_config.yaml", "rayservice.yaml", "cluster-launcher.yaml", "medserve.yaml")
_HEADER = "# Written by `medserve cluster render{options}` from {source}: edit that, not this.\n"


def _usage(config: AppConfig) -> dict[str, str]:
    """How each file is used: the comment under its header."""
    cluster = config.cluster
    redis_password = bool(cluster.redis_address and cluster.redis_password_secret)
    launcher = [
        f"(umask 077; openssl rand -hex 32 > {RAY_AUTH_TOKEN_PATH.name})   # once: Ray's token, copied to every node",
        *(
            [f"(umask 077; cat > {REDIS_PASSWORD_PATH.name})   # once: Redis's password, typed in"]
            if redis_password
            else []
        ),
        "ray up cluster-launcher.yaml, then",
        f"ray exec cluster-launcher.yaml 'RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={RAY_AUTH_TOKEN_PATH} \\",
        f"  serve deploy {SERVE_CONFIG_PATH}'",
    ]
    if redis_password:
        launcher += [
            "Ray gives Redis's password to its GCS as an argument: on a head shared with other users, mount /proc",
            "with hidepid=2, so that they cannot read it.",
        ]
    lines = {
        "serve_config.yaml": [
            "serve run serve_config.yaml (a local Ray), or serve deploy serve_config.yaml (a running",
            "cluster); every node needs medserve installed. config null: the YAML $MEDSERVE_CONFIG names, else the",
            "packaged one.",
        ],
        "rayservice.yaml": [
            f"kubectl create secret generic {cluster.ray_auth_token_secret} "
            "--from-literal=auth_token=$(openssl rand -hex 32)   # once: Ray's token",
            "kubectl apply -f rayservice.yaml  (KubeRay operator >= 1.6; Redis and its password",
            "Secret for the GCS's fault tolerance, an image with medserve installed: README, Running on a cluster)",
            "The head's dashboard listens on its pod's address: KubeRay's operator deploys the Serve config through",
            "it. Ray's token guards it, and the NetworkPolicy lets only the operator and the cluster's own pods in.",
        ],
        "cluster-launcher.yaml": launcher,
        "medserve.yaml": [
            "The application's YAML as the cluster's nodes read it: keep it out of version control",
            "when it holds PACS credentials.",
        ],
    }
    return {name: "".join(f"# {line}\n" for line in text) for name, text in lines.items()}


def render_manifests(config: AppConfig, config_path: Path | None) -> dict[str, str]:
    """File name -> text, for each of ``MANIFEST_FILES``:

    - ``serve_config.yaml``: for ``serve deploy`` / ``serve run`` on a cluster whose nodes read ``config_path``;
    - ``rayservice.yaml``: the KubeRay RayService with its Secret, PersistentVolumeClaim and NetworkPolicy;
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
    usage = _usage(config)
    return {name: header + usage[name] + text for name, text in texts.items()}


class _Dumper(yaml.SafeDumper):
    """YAML for people: no anchors and aliases, text of several lines (an embedded config) as a literal block."""

    def ignore_aliases(self, data) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _text)
