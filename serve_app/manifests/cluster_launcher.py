"""A Ray cluster-launcher file (``ray up``) for medserve on a hospital's own servers: Ray's ``local`` provider, a
head at ``cluster.head_ip`` and GPU workers at ``cluster.worker_ips``, every node with medserve installed and the
shared volume mounted at ``storage.root``. Ray starts with token authentication, the ingress mode and, when
configured, the GCS in Redis and NVIDIA MPS on the workers; then ``serve deploy`` the Serve config file.

Secrets reach the nodes as files, never in this file or on a command line it writes: Ray's token
(``ray-auth-token``) and Redis's password (``redis-password``), made beside the launcher file by the operator, are
copied to ``/etc/medserve/`` and kept 0600 there; Ray reads the token from ``RAY_AUTH_TOKEN_PATH``.
"""

from __future__ import annotations

import shlex

from serve_app.config import CONFIG_ENVIRONMENT_VARIABLE, AppConfig
from serve_app.manifests.serve_config import APP_CONFIG_PATH, SERVE_CONFIG_PATH

__all__ = ["RAY_AUTH_TOKEN_PATH", "REDIS_PASSWORD_PATH", "cluster_launcher"]

_GCS_PORT = 6379
# Where every node keeps Ray's token and Redis's password (copied from files of these names beside the launcher file).
RAY_AUTH_TOKEN_PATH = APP_CONFIG_PATH.with_name("ray-auth-token")
REDIS_PASSWORD_PATH = APP_CONFIG_PATH.with_name("redis-password")


def cluster_launcher(config: AppConfig) -> dict:
    """The launcher file. It copies ``medserve.yaml`` and ``serve_config.yaml`` (rendered beside it) and Ray's
    token (and Redis's password) to every node, and starts Ray there with ``$MEDSERVE_CONFIG`` naming the first,
    which ``serve deploy`` of the second builds the application from."""
    cluster = config.cluster
    secrets = [RAY_AUTH_TOKEN_PATH]  # copied from files of their names beside the launcher file
    environment = {
        **config.http.ray_environment(),
        CONFIG_ENVIRONMENT_VARIABLE: str(APP_CONFIG_PATH),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(RAY_AUTH_TOKEN_PATH),
    }
    head_environment = dict(environment)
    # The dashboard on loopback: nothing outside the head needs it (`ray dashboard` forwards it over SSH).
    head_start = f"ray start --head --port={_GCS_PORT} --num-cpus=0 --dashboard-host=127.0.0.1"
    head_start += " --autoscaling-config=~/ray_bootstrap_config.yaml"
    if cluster.redis_address:
        # The head's GCS keeps its state in Redis. Ray takes its password only as an argument (and hands it to
        # the GCS as one): read from the node's 0600 file as Ray starts, it is written in no other file.
        head_environment["RAY_REDIS_ADDRESS"] = cluster.redis_address
        if cluster.redis_password_secret:
            secrets.append(REDIS_PASSWORD_PATH)
            head_start += f' --redis-password="$(cat {REDIS_PASSWORD_PATH})"'
    worker_start = [f"{_assignments(environment)} ray start --address=$RAY_HEAD_IP:{_GCS_PORT}"]
    worker_start[0] += f" --num-gpus={cluster.gpu_workers.gpus}"
    if config.gpu_sharing == "mps":
        worker_start.insert(0, "nvidia-cuda-mps-control -d || true  # already running is fine")
    # rsync keeps the modes the files had where `ray up` ran: made private here, whatever they were there
    # (the application's YAML may hold PACS credentials).
    private = f"chmod 600 {' '.join(str(path) for path in [APP_CONFIG_PATH, *secrets])}"
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
            **{str(path): f"./{path.name}" for path in secrets},
        },
        "setup_commands": [f"pip install 'medserve=={_version()}'"],
        "head_start_ray_commands": ["ray stop", private, f"{_assignments(head_environment)} {head_start}"],
        "worker_start_ray_commands": ["ray stop", private, *worker_start],
    }


def _assignments(environment: dict[str, str]) -> str:
    return " ".join(f"{key}={shlex.quote(value)}" for key, value in environment.items())


def _version() -> str:
    from serve_app import __version__

    return __version__
