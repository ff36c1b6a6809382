"""A Ray cluster-launcher file (``ray up``) for medserve on a hospital's own servers: Ray's ``local`` provider, a
head at ``cluster.head_ip`` and GPU workers at ``cluster.worker_ips``, every node with medserve installed and the
shared volume mounted at ``storage.root``. Ray starts with the ingress mode and, when configured, the GCS in Redis
and NVIDIA MPS on the workers; then ``serve deploy`` the Serve config file.
"""

from __future__ import annotations

import shlex

from serve_app.config import CONFIG_ENVIRONMENT_VARIABLE, AppConfig
from serve_app.manifests.serve_config import APP_CONFIG_PATH, SERVE_CONFIG_PATH

__all__ = ["cluster_launcher"]

_GCS_PORT = 6379


def cluster_launcher(config: AppConfig) -> dict:
    """The launcher file. It copies ``medserve.yaml`` and ``serve_config.yaml`` (rendered beside it) to every node,
    and starts Ray there with ``$MEDSERVE_CONFIG`` naming the former, which ``serve deploy`` of the latter builds
    the application from."""
    cluster = config.cluster
    environment = {**config.http.ray_environment(), CONFIG_ENVIRONMENT_VARIABLE: str(APP_CONFIG_PATH)}
    head_environment = dict(environment)
    head_start = f"ray start --head --port={_GCS_PORT} --num-cpus=0 --dashboard-host=0.0.0.0"
    head_start += " --autoscaling-config=~/ray_bootstrap_config.yaml"
    if cluster.redis_address:
        # The head's GCS keeps its state in Redis; the password comes from the head's own environment.
        head_environment["RAY_REDIS_ADDRESS"] = cluster.redis_address
        head_start += ' --redis-password="$MEDSERVE_REDIS_PASSWORD"'
    worker_start = [f"{_assignments(environment)} ray start --address=$RAY_HEAD_IP:{_GCS_PORT}"]
    worker_start[0] += f" --num-gpus={cluster.gpu_workers.gpus}"
    if config.gpu_sharing == "mps":
        worker_start.insert(0, "nvidia-cuda-mps-control -d || true  # already running is fine")
    return {
        "cluster_name": config.name,
        "provider": {"type": "local", "head_ip": cluster.head_ip, "worker_ips": list(cluster.worker_ips)},
        "auth": {"ssh_user": cluster.ssh_user},
        "max_workers": len(cluster.worker_ips),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "file_mounts": {
            str(APP_CONFIG_PATH): f"./{APP_CONFIG_PATH.name}",
            str(SERVE_CONFIG_PATH): f"./{SERVE_CONFIG_PATH.name}",
        },
        "setup_commands": [f"pip install 'medserve=={_version()}'"],
        "head_start_ray_commands": ["ray stop", f"{_assignments(head_environment)} {head_start}"],
        "worker_start_ray_commands": ["ray stop", *worker_start],
    }


def _assignments(environment: dict[str, str]) -> str:
    return " ".join(f"{key}={shlex.quote(value)}" for key, value in environment.items())


def _version() -> str:
    from serve_app import __version__

    return __version__
