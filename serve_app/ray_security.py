"""The Ray clusters medserve starts: token-authenticated, on loopback, with HAProxy's sockets private.

Ray runs whatever code a client that reaches its ports sends, so every cluster medserve starts has Ray's token
authentication on (``RAY_AUTH_MODE=token``). The token is made once and kept 0600 in ``<storage.root>/state/
ray-auth-token`` (a 0700 folder), or taken from ``RAY_AUTH_TOKEN`` where that is set; Ray's processes read it
through the environment (``RAY_AUTH_TOKEN_PATH``), never from a command line. A single-node cluster binds its ports
to ``ray.node_ip_address`` (loopback by default) and starts no Ray Client server unless
``ray.client_server_port`` asks for one. HAProxy's admin socket (``mode 666 level admin`` in Ray's template) and
its metrics socket go into a 0700 folder of medserve's user.

Usage::

    environment = cluster_environment(config)        # for `ray start`: ingress, token, loopback, HAProxy's folder
    subprocess.run(ray_start_command(config, cpus=4, dashboard=False), env={**os.environ, **environment})
    authenticate_this_process(config, local=True)    # before Ray is imported, in a process that joins it

    apply_environment({**token_environment(), **haproxy_environment(folder)})  # a test cluster: a fresh token
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

from serve_app.config import AppConfig, is_loopback
from serve_app.storage import UnsafeStorage, private_folder

__all__ = [
    "RAY_CLI",
    "TOKEN_FILE_NAME",
    "apply_environment",
    "authenticate_this_process",
    "cluster_environment",
    "haproxy_environment",
    "haproxy_folder",
    "ray_start_command",
    "state_folder",
    "token_environment",
]

TOKEN_FILE_NAME = "ray-auth-token"
# Ray's own CLI, installed beside this interpreter: found even where the venv is not activated.
RAY_CLI = str(Path(sys.executable).with_name("ray"))
# Ray's HAProxy manager puts its sockets at <folder>/<node id: 56 hex digits>/<name> (serve/_private/haproxy.py),
# and HAProxy 2.8 takes socket paths of up to 97 bytes: the longest name is "metrics.sock".
_MAX_HAPROXY_FOLDER_LENGTH = 97 - len("/") - 56 - len("/metrics.sock")


def state_folder(config: AppConfig) -> Path:
    """``<storage.root>/state``: medserve's own files (the Ray token), created 0700; ``UnsafeStorage`` where it is
    not this user's alone."""
    return private_folder(config.storage.root / "state")


def token_environment(token: str | None = None) -> dict[str, str]:
    """Ray's token authentication with ``token`` given in the environment (``RAY_AUTH_TOKEN``); None: a fresh one.
    For clusters that live as long as one process tree (tests); ``medserve up`` keeps its token in a file."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token or secrets.token_hex(32)}


def _authentication_environment(config: AppConfig, create: bool) -> dict[str, str]:
    # RAY_AUTH_TOKEN, where the operator set it, is the token: Ray reads it before RAY_AUTH_TOKEN_PATH.
    if os.environ.get("RAY_AUTH_TOKEN"):
        return {"RAY_AUTH_MODE": "token"}
    token_file = state_folder(config) / TOKEN_FILE_NAME
    if create and not token_file.exists():
        # O_EXCL: two `medserve up` at once cannot each write a token and start Ray with different ones.
        try:
            descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with open(descriptor, "w") as file:
                file.write(secrets.token_hex(32))  # 256 bits, as Ray's own `ray get-auth-token --generate`
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


def authenticate_this_process(config: AppConfig, *, local: bool, create: bool = False) -> None:
    """Give this process what its ``ray.init`` needs to join the cluster: the token (``create``: made if there is
    none yet) and, for the ``local`` cluster `medserve up` starts on a loopback address, Ray's single-machine mode
    (else Ray turns 127.0.0.1 into the node's routable address, where nothing listens). Call it before Ray is
    imported; Ray's cached config and token are reloaded all the same."""
    apply_environment(
        {**_authentication_environment(config, create), **(_single_machine_environment(config) if local else {})}
    )


def apply_environment(environment: dict[str, str]) -> None:
    """``environment`` set in this process, for the Ray it starts or joins; Ray's cached config and token (read
    once, from the environment) reloaded, should Ray have read them already."""
    os.environ.update(environment)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def haproxy_folder(config: AppConfig) -> Path:
    """A 0700 folder of this user for HAProxy's sockets, config and state: ``<storage.root>/state/haproxy``, or,
    where that path is too long for a socket's, a folder ``mkdtemp`` made, which ``state/haproxy`` links to."""
    link = state_folder(config) / "haproxy"
    if len(str(link)) <= _MAX_HAPROXY_FOLDER_LENGTH and not link.is_symlink():
        folder = private_folder(link)
    elif link.is_symlink():
        try:
            folder = private_folder(link.resolve())
        except (UnsafeStorage, OSError):  # /tmp emptied since, and the name taken by another user
            folder = _new_haproxy_link(link)
    else:
        folder = _new_haproxy_link(link)
    # Only its user may reach the admin socket inside (Ray's template makes that socket 666).
    folder.chmod(0o700)
    return folder


def _new_haproxy_link(link: Path) -> Path:
    # mkdtemp: a name no other user could have taken first, 0700 and ours; short enough for HAProxy.
    folder = Path(tempfile.mkdtemp(prefix="mshap-", dir="/tmp"))  # 19 characters
    link.unlink(missing_ok=True)
    link.symlink_to(folder)
    return folder


def haproxy_environment(folder: Path) -> dict[str, str]:
    """Ray Serve's HAProxy with its admin and metrics sockets, config and server state in ``folder`` (0700, this
    user's), not in the shared /tmp/haproxy-serve; Ray adds a sub-folder per node."""
    return {
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
    }


def cluster_environment(config: AppConfig) -> dict[str, str]:
    """The environment ``ray start`` must run with for ``config``: the ingress's (``http.ray_environment()``),
    token authentication (the token made if there is none yet), HAProxy's private folder and, for a loopback
    ``ray.node_ip_address``, Ray's single-machine mode."""
    environment = {
        "RAY_USAGE_STATS_ENABLED": "0",
        **config.http.ray_environment(),
        **_authentication_environment(config, create=True),
        **haproxy_environment(haproxy_folder(config)),
    }
    return {**environment, **_single_machine_environment(config)}


def _single_machine_environment(config: AppConfig) -> dict[str, str]:
    # `ray start --node-ip-address=127.0.0.1` alone is turned into the node's routable address
    # (services.resolve_ip_for_localhost); in Ray's single-machine mode (no other node may join) the node's address
    # stays loopback, and the GCS, raylet, object manager and agents bind to it.
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} if is_loopback(config.ray.node_ip_address) else {}


def ray_start_command(config: AppConfig, cpus: int, dashboard: bool) -> list[str]:
    """``ray start --head`` for a node of ``config``: its ports on ``ray.node_ip_address``, the dashboard (when
    asked for) on loopback, and the Ray Client server only where ``ray.client_server_port`` names its port."""
    options = [
        "start", "--head", f"--node-ip-address={config.ray.node_ip_address}", f"--port={config.ray.port}",
        f"--num-cpus={cpus}", "--disable-usage-stats", f"--include-dashboard={str(dashboard).lower()}",
        "--dashboard-host=127.0.0.1",
    ]  # fmt: skip
    if config.ray.client_server_port is not None:
        return [RAY_CLI, *options,
                f"--ray-client-server-port={config.ray.client_server_port}"]  # fmt: skip
    # Ray 2.60's `ray start --head` starts the Ray Client server on 10001 whenever grpc is importable, and has no
    # option to leave it out (scripts.py; port 0 is refused). This runs Ray's own `ray start` with that check
    # answering "not installed": the only difference is the server it does not start.
    return [sys.executable, "-m", "serve_app.ray_security", *options]


def _ray_start_without_client_server() -> None:
    import ray.scripts.scripts as ray_scripts

    ray_scripts.get_ray_client_dependency_error = lambda: ImportError("the Ray Client server is not started")
    ray_scripts.cli(prog_name="ray")


if __name__ == "__main__":
    _ray_start_without_client_server()
