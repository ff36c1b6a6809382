"""``medserve up`` and ``medserve down``: start (or join) a Ray cluster and deploy medserve; take it down.
``medserve reload``: deploy again on the running cluster, so that models added to or changed in the repository are
served; Serve restarts only the deployments that changed (serve_app/app.py), the others keep serving.
``medserve cluster render``: the manifests of a multi-node deployment, from the same config.

The Ray cluster `medserve up` starts is token-authenticated, on loopback, without a Ray Client server
(serve_app/ray_security.py); every command here that talks to Ray authenticates with that token.

These commands print medserve's own progress; Ray's output stays in its log files (`up` prints their folder once),
and ``--verbose`` shows it. `up` records what it started (serve_app/cli/up_record.py): `down` and `reload` act on
that application when given no --config or --address. A local cluster Ray still names in its current-cluster file
whose processes died (killed by the OOM killer, say) is found dead within seconds, and `up` starts a fresh one."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve_app import mps
from serve_app.cli.errors import CommandError
from serve_app.cli.up_record import UpRecord
from serve_app.config import AppConfig, load_config
from serve_app.ray_security import (
    RAY_CLI,
    authenticate_this_process,
    cluster_environment,
    ray_start_command,
    state_folder,
)
from serve_app.storage import UnsafeStorage, secure_storage, set_private_umask

# How long a Ray GCS address may take to accept a connection before its cluster is taken for dead: Ray's own
# `ray.init` would retry a dead one for many minutes.
_GCS_PROBE_TIMEOUT_S = 3

__all__ = ["add_commands", "wait_until_ready"]


def add_commands(commands) -> None:
    up = commands.add_parser("up", help="start (or join) a Ray cluster and deploy medserve")
    up.add_argument("--config", type=Path, help="application YAML (default: the packaged one)")
    up.add_argument("--address", help="Ray cluster to join (default: the local one, started if absent)")
    up.add_argument("--host", help="address the API listens on (overrides http.host)")
    up.add_argument(
        "--monitoring",
        action="store_true",
        help="also start Prometheus, the GPU exporter and Grafana (where installed) on loopback",
    )
    _add_verbose(up)
    up.set_defaults(run=_up)

    reload = commands.add_parser(
        "reload",
        help="deploy medserve again on the running cluster: new or changed models served, the others untouched",
    )
    reload.add_argument("--config", type=Path, help="application YAML (default: the one medserve up was given)")
    reload.add_argument("--address", help="Ray cluster (default: the one medserve up started or joined)")
    _add_verbose(reload)
    reload.set_defaults(run=_reload)

    down = commands.add_parser(
        "down", help="drain medserve (new work refused, work in flight finished), remove it, stop the local Ray cluster"
    )
    down.add_argument("--config", type=Path, help="application YAML it was started with (default: medserve up's)")
    down.add_argument("--address", help="Ray cluster it runs on (default: the one medserve up started or joined)")
    down.add_argument(
        "--grace-s", type=float, help="seconds requests in flight may take to finish (default: limits.drain_grace_s)"
    )
    down.add_argument("--keep-ray", action="store_true", help="leave the Ray cluster running")
    _add_verbose(down)
    down.set_defaults(run=_down)

    cluster = commands.add_parser("cluster", help="multi-node deployments")
    actions = cluster.add_subparsers(dest="cluster_command", required=True)
    render = actions.add_parser(
        "render", help="write the KubeRay RayService, the Ray cluster-launcher file and the Serve config from a config"
    )
    render.add_argument("--config", type=Path, help="application YAML (default: the packaged one)")
    render.add_argument("--out", type=Path, default=Path("cluster"), help="folder to write into (default: cluster)")
    render.set_defaults(run=_render)


def _add_verbose(parser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own output too")


def _render(args) -> int:
    from serve_app.manifests import render_manifests

    config = load_config(args.config)
    # The cluster's pods serve the API on their own addresses (0.0.0.0), whatever http.host says.
    in_pods = config.model_copy(update={"http": config.http.model_copy(update={"host": "0.0.0.0"})})
    if in_pods.open_server_refusal():
        raise CommandError(
            "no tenants are configured, and a cluster's pods serve the API on their own addresses (0.0.0.0, "
            f"whatever http.host says): anyone who reaches port {config.http.port} could send studies, list every "
            "WSI job and download every result without a key. Configure tenants (medserve tenant-key), or set "
            "http.allow_open: true to accept that risk"
        )
    if config.http.allowed_hosts is None:
        # Left to its default, the allow-list names only loopback names, which no client of a cluster uses.
        raise CommandError(
            "http.allowed_hosts is not set: the API answers only requests whose Host header it names, and a "
            "cluster's clients reach it by your Service's or ingress's name. Set it to those names "
            '(allowed_hosts: [medserve.hospital.example]), or ["*"] behind a proxy that checks the Host'
        )
    files = render_manifests(config, args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        # 0600, whatever the file was: medserve.yaml and rayservice.yaml may hold PACS credentials.
        descriptor = os.open(args.out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(descriptor, 0o600)
        with open(descriptor, "w") as file:
            file.write(text)
        print(args.out / name)
    return 0


def _up(args) -> int:
    config = load_config(args.config, overrides={"http.host": args.host} if args.host else None)
    refusal = config.open_server_refusal()
    if refusal:
        raise CommandError(refusal)
    # Before Ray starts: its processes and the replicas inherit the umask, so what they write is 0600/0700.
    set_private_umask()
    try:
        secure_storage(config)
    except UnsafeStorage as e:
        raise CommandError(str(e)) from None
    _authenticate(config, args.address, create=True)
    if _connected(args.address, args.verbose):
        _note_joined_cluster(config)
    elif args.address:
        raise CommandError(f"no Ray cluster answers at {args.address}")
    else:
        _start_local_ray(config, dashboard=args.monitoring, verbose=args.verbose)
        if not _connected(None, args.verbose):
            raise CommandError("the local Ray cluster medserve started does not answer; see `ray status`")
    _print_ray_logs_folder()
    url = _deploy(config)
    UpRecord.of(config, args.config, args.host, args.address, url).write()
    if args.monitoring:
        _start_monitoring()
    return 0


def _reload(args) -> int:
    config, address, record = _started_application(args)
    _authenticate(config, address)
    if not _connected(address, args.verbose):
        raise CommandError("no Ray cluster is running: start medserve with medserve up")
    url = _deploy(config)
    if args.config is not None or record is None:
        UpRecord.of(config, args.config, None, address, url).write()
    return 0


def _started_application(args) -> tuple[AppConfig, str | None, UpRecord | None]:
    """The config and Ray address a command acts on: those given, else those `medserve up` recorded, else the
    packaged config on the local cluster; and the record, if any."""
    record = UpRecord.read()
    address = args.address or (record.address if record else None)
    if args.config is not None or record is None:
        return load_config(args.config), address, record
    print(f"medserve: {record.name} as medserve up started it, from {record.config or 'the packaged config'}")
    return record.load_config(), address, record


def _authenticate(config: AppConfig, address: str | None, create: bool = False) -> None:
    """This process given the token of the cluster (made, with ``create``, if there is none yet)."""
    try:
        authenticate_this_process(config, local=not address, create=create)
    except UnsafeStorage as e:
        raise CommandError(str(e)) from None


def _connected(address: str | None, verbose: bool) -> bool:
    """Connect this process to the Ray cluster at ``address`` (when None, the one `ray start` last started here,
    not any other Ray found running on this machine); False where none answers."""
    import ray
    from ray._private.utils import read_ray_address
    from ray.exceptions import AuthenticationError

    # $RAY_ADDRESS, else Ray's current-cluster file; not Ray's own search, which picks among every Ray running on the
    # machine (and warns that it found several).
    recorded = None if address else (os.environ.get("RAY_ADDRESS") or read_ray_address())
    address = address or recorded
    if address is None:
        return False
    if not _gcs_answers(address):
        if recorded:
            print(
                f"medserve: the Ray cluster last started here ({address}, named in {_current_cluster_source()}) "
                "does not answer: its processes have died",
                file=sys.stderr,
            )
        return False
    try:
        # The cluster's own logs stay in its log files: a command prints what it did, not every replica's lines.
        ray.init(address=address, logging_level="INFO" if verbose else "ERROR", log_to_driver=verbose)
    except ConnectionError:
        return False
    except AuthenticationError:
        raise CommandError(
            f"the Ray cluster at {address} refused medserve's Ray token: it was started with another token (set "
            "RAY_AUTH_TOKEN to its token, or use the storage.root it was started with)"
        ) from None
    # Serve's logger in this process ("Deploying app…", "Deleting app…"): its warnings and errors only. Set once
    # Serve is imported: its import sets the logger to INFO.
    from ray import serve  # noqa: F401

    logging.getLogger("ray.serve").setLevel(logging.INFO if verbose else logging.WARNING)
    return True


def _gcs_answers(address: str) -> bool:
    """Whether the Ray GCS at ``address`` (host:port) accepts a connection within seconds. A cluster whose
    processes were killed leaves its address behind, and ``ray.init`` would retry it for many minutes."""
    host, _, port = address.rpartition(":")
    if not port.isdigit():  # not host:port: left to ray.init
        return True
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_GCS_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _current_cluster_source() -> str:
    from ray._private.utils import get_ray_address_file

    return "$RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else get_ray_address_file(None)


def _print_ray_logs_folder() -> None:
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()  # Ray has no public call for it
    print(f"medserve: Ray's logs: {Path(session) / 'logs'}")


def _deploy(config: AppConfig) -> str:
    """Deploy (or deploy again) the application on the connected cluster and wait until it is ready; say which
    models are served and which were refused. Returns the API's URL."""
    from ray import serve

    from serve_app.app import build_app, read_checked_repository
    from serve_app.drain import DrainOrder

    # A drain that a `medserve down` began and did not finish must not hold the new deployment's replicas.
    DrainOrder(config).clear()
    serve.start(**config.http.serve_start_options(), **config.grpc.serve_start_options())
    repository = read_checked_repository(config)
    print(f"medserve: deploying {config.name}, waiting until it is ready")
    serve.run(build_app(config, repository), name=config.name, route_prefix="/", blocking=False)
    url = f"http://{config.http.host}:{config.http.port}"
    wait_until_ready(url, timeout_s=300)
    print(f"medserve is up at {url}  (models: {url}/v1/models)")
    if config.grpc.enabled:
        print(f"medserve's gRPC inference service is at {config.http.host}:{config.grpc.port}")
    for spec in repository:
        print(f"  {spec.name} {spec.version} ({spec.source})")
    for refused in repository.refused:
        print(f"  refused {refused.path}: {refused.reason}", file=sys.stderr)
    return url


def _start_monitoring() -> None:
    from serve_app.observability import monitoring

    if not monitoring.RAY_SERVICE_DISCOVERY_FILE.exists():
        print(
            f"medserve: {monitoring.RAY_SERVICE_DISCOVERY_FILE} is missing: Prometheus finds the Ray cluster through "
            "it, and Ray's dashboard writes it (start Ray with its dashboard)",
            file=sys.stderr,
        )
    try:
        urls = monitoring.start()
    except FileNotFoundError as e:
        raise CommandError(str(e)) from None
    for name, url in urls.items():
        print(f"medserve: {name}: {url}")
    if "grafana" not in urls:
        print(
            "grafana is not installed: dashboards/grafana/ holds its provisioning for a Grafana of your own",
            file=sys.stderr,
        )


def _note_joined_cluster(config: AppConfig) -> None:
    # The ingress and GPU sharing are the cluster's, fixed when Ray started on each node.
    env = " ".join(f"{k}={v}" for k, v in config.http.ray_environment().items())
    print(
        f"medserve: joined a running Ray cluster: its nodes decide the ingress (http.ingress {config.http.ingress} "
        f"needs {env} where Ray starts) and GPU sharing (README: Ingress, GPU sharing)",
        file=sys.stderr,
    )


def _start_local_ray(config: AppConfig, dashboard: bool, verbose: bool) -> None:
    # Deployments ask for fractions of a CPU; advertising at least 4 lets the whole graph fit on 2 cores.
    cpus = max(4, os.cpu_count() or 1)
    # Ray's dashboard writes the service-discovery file Prometheus reads: only worth its memory when monitored.
    command = ray_start_command(config, cpus=cpus, dashboard=dashboard)
    env = {**os.environ, **cluster_environment(config)}
    if config.gpu_sharing == "mps":
        try:
            env.update(mps.start())
        except mps.MpsUnavailable as e:
            print(f"medserve: gpu_sharing mps: {e}; the GPU is time-sliced", file=sys.stderr)
    print(f"medserve: starting a local Ray cluster on {config.ray.node_ip_address}:{config.ray.port}")
    if verbose:
        subprocess.run(command, check=True, env=env)
        return
    # Into a file, not a pipe: Ray's daemons inherit `ray start`'s output and outlive it.
    log = state_folder(config) / "ray-start.log"
    with log.open("w") as out:
        started = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if started.returncode != 0:
        last = (log.read_text().strip().splitlines() or ["no output"])[-1]
        raise CommandError(f"ray start failed ({last}); its output is in {log}")


def wait_until_ready(url: str, timeout_s: float) -> None:
    """Poll /readyz; CommandError when the application is not ready in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise CommandError(f"medserve did not become ready at {url} within {timeout_s:.0f} s")


def _drain(config: AppConfig, grace_s: float) -> None:
    """New work refused at once (503), requests in flight finished (up to ``grace_s``), then the app deleted."""
    from ray import serve

    from serve_app.drain import DrainOrder

    applications = serve.status().applications
    if config.name not in applications:
        return
    ingress = applications[config.name].deployments.get("Ingress")
    replicas = ingress.replica_states.get("RUNNING", 0) if ingress else 0
    order = DrainOrder(config)
    order.start(grace_s)
    print(f"medserve: draining {config.name}: new work refused, requests in flight finish (up to {grace_s:g} s)")
    left = order.wait(replicas)
    if len(left) < replicas:
        print(
            f"medserve: {replicas - len(left)} of {replicas} ingress replicas did not answer the drain order within "
            f"{grace_s:g} s: the order is under {config.storage.root}; give --config the file {config.name} was "
            "started with",
            file=sys.stderr,
        )
    if any(left.values()):
        print(f"medserve: {sum(left.values())} requests still in flight after {grace_s:g} s", file=sys.stderr)
    serve.delete(config.name)
    order.clear()


def _down(args) -> int:
    from serve_app.observability import monitoring

    for name in monitoring.stop():
        print(f"medserve: stopped {name}")
    config, address, record = _started_application(args)
    _authenticate(config, address)  # before Ray is imported: it reads its single-machine mode once
    import ray
    from ray import serve

    if not _connected(address, args.verbose):
        print("medserve: no Ray cluster is running", file=sys.stderr)
    else:
        _drain(config, config.limits.drain_grace_s if args.grace_s is None else args.grace_s)
        serve.shutdown()
        ray.shutdown()
    if not args.keep_ray:
        quiet = {} if args.verbose else {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run([RAY_CLI, "stop"], check=False, **quiet)
        if mps.stop():
            print("medserve: stopped the MPS control daemon")
    if record is not None and record.describes(config):
        UpRecord.forget()
    print("medserve is down")
    return 0
