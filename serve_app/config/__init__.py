"""The one configuration model of a medserve application.

YAML in, validated once at start; a bad field fails with a message that names it
(``deployments.model.num_gpus: Input should be less than or equal to 8``).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from serve_app.config.dicom_network import (
    DestinationConfig,
    DestinationName,
    DicomNetworkConfig,
    RouteConfig,
    RouteName,
    check_against,
)
from serve_app.config.input_monitoring import InputMonitoringConfig
from serve_app.config.pacs import ALL_TENANTS, PacsConfig, PacsName
from serve_app.config.rollout import RolloutConfig
from serve_app.config.tenancy import AuditConfig, SchedulingConfig, TenantConfig, TenantId
from serve_app.strict_model import StrictModel

__all__ = [
    "CONFIG_ENVIRONMENT_VARIABLE",
    "DEFAULT_CONFIG_PATH",
    "EMBEDDED_MODEL_REPOSITORY",
    "AppConfig",
    "AutoscalingConfig",
    "BatchingConfig",
    "ClusterConfig",
    "ConfigError",
    "DeploymentConfig",
    "DeploymentsConfig",
    "GRPC_SERVICER_FUNCTION",
    "GrpcConfig",
    "HttpConfig",
    "InputMonitoringConfig",
    "LimitsConfig",
    "ModelDeploymentConfig",
    "NodeGroupConfig",
    "RayConfig",
    "ReadingConfig",
    "RolloutConfig",
    "StorageConfig",
    "WsiConfig",
    "default_storage_root",
    "is_loopback",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.yaml")
# Names the application's YAML where no path is given to Serve's app builder (nodes of a launched cluster).
CONFIG_ENVIRONMENT_VARIABLE = "MEDSERVE_CONFIG"
EMBEDDED_MODEL_REPOSITORY = Path(__file__).parent.parent / "models"


class AutoscalingConfig(StrictModel):
    """Serve's autoscaling of a deployment between ``min_replicas`` and ``max_replicas``."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(1, ge=1, description="Replicas at most.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Requests in progress per replica that Serve scales towards."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Seconds a backlog must last before replicas are added.")
    downscale_delay_s: float = Field(
        600.0, ge=0, description="Seconds a deployment must be over-provisioned before replicas are removed."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Seconds of requests-in-progress figures Serve averages to decide."
    )
    # Serve marks this field deprecated in favour of RAY_SERVE_{REPLICA,HANDLE}_AUTOSCALING_METRIC_PUSH_INTERVAL_S, but
    # Ray 2.60's replicas and handles still push every metrics_interval_s and read neither variable.
    metrics_interval_s: float = Field(
        10.0,
        gt=0,
        description="Seconds between the replicas' reports of their requests in progress to Serve's controller: how "
        "old the figures it decides on may be. Below look_back_period_s, or Serve warns.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        return self


class DeploymentConfig(StrictModel):
    """Resources and scaling of one Serve deployment."""

    num_replicas: int = Field(1, ge=1, description="Replicas, when autoscaling is not set.")
    autoscaling: AutoscalingConfig | None = Field(None, description="Autoscaling; replaces num_replicas when set.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs Ray reserves for each replica (fractions allowed).")
    num_gpus: float = Field(
        0.0, ge=0, le=8, description="GPUs Ray reserves for each replica: 0.25 puts four replicas on one GPU."
    )
    resources: dict[str, float] = Field(
        {},
        description="Custom Ray resources each replica reserves, e.g. {model_slot: 1}: its replicas go only to nodes "
        "started with that resource (`ray start --resources`), and no more of them than it has.",
    )
    max_ongoing_requests: int = Field(8, ge=1, description="Requests a replica takes at once before Serve queues.")
    max_queued_requests: int | None = Field(
        None,
        ge=1,
        description="Requests Serve queues for this deployment's replicas (beyond max_ongoing_requests each) before "
        "it refuses new ones at once with a 503 and Retry-After; null: no bound (requests wait however long).",
    )

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": self.resources},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.max_queued_requests is not None:
            options["max_queued_requests"] = self.max_queued_requests
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class BatchingConfig(StrictModel):
    """``@serve.batch`` of a model deployment; changed live through its Serve user_config."""

    max_batch_size: int = Field(4, ge=1, le=256, description="Studies in one model batch at most.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="Seconds a batch waits to fill before it runs with what it has."
    )

    def apply_to(self, batched_method) -> None:
        """Retune a live ``@serve.batch`` method (from a deployment's ``reconfigure``)."""
        batched_method.set_max_batch_size(self.max_batch_size)
        batched_method.set_batch_wait_timeout_s(self.batch_wait_timeout_s)


class ModelDeploymentConfig(DeploymentConfig):
    """A model deployment: a deployment's resources, and its batching."""

    batching: BatchingConfig = Field(BatchingConfig(), description="Dynamic batching of the model's replicas.")


class DeploymentsConfig(StrictModel):
    """Resources of each deployment of the application."""

    ingress: DeploymentConfig = Field(
        DeploymentConfig(num_cpus=0.25, max_ongoing_requests=64), description="The HTTP ingress."
    )
    preprocess: DeploymentConfig = Field(DeploymentConfig(), description="Preprocessing (split layout).")
    model: ModelDeploymentConfig = Field(
        ModelDeploymentConfig(), description="Every model's deployment, unless `models` overrides it."
    )
    postprocess: DeploymentConfig = Field(DeploymentConfig(), description="Postprocessing (split layout).")
    tile_model: DeploymentConfig = Field(
        DeploymentConfig(
            num_cpus=0.5,
            max_ongoing_requests=4,
            autoscaling=AutoscalingConfig(
                min_replicas=0, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=5, downscale_delay_s=120
            ),
        ),
        description="Every tile classifier's deployment (WSI jobs): from 0 replicas when no job runs, scaled "
        "with the jobs' backlog of tile chunks.",
    )


class LimitsConfig(StrictModel):
    """What one request may send. A 512x512x2000 CT is about 1 GB of int16; the defaults admit it, not more."""

    max_upload_bytes: int = Field(
        2 * 1024**3,
        gt=0,
        description="Bytes one request may write to storage: its body, and what its archives unpack to, together.",
    )
    max_volume_voxels: int = Field(
        512 * 512 * 2000, gt=0, description="Voxels of one study, checked from headers before pixels are decoded."
    )
    max_files_per_upload: int = Field(
        10_000, gt=0, description="Files one request may hold: multipart parts and archive entries, together."
    )
    request_deadline_s: float = Field(
        600.0,
        gt=0,
        description="Seconds a segment request may take, from its arrival to its answer (upload, queueing and every "
        "stage); past it the client gets 504 and the request's work is cancelled in every stage. A tenant may set "
        "its own (tenants.<id>.request_deadline_s).",
    )
    drain_grace_s: float = Field(
        120.0,
        ge=0,
        description="Seconds `medserve down` lets requests in flight finish (new work is refused with 503 from the "
        "start) before it stops the application anyway.",
    )


class ReadingConfig(StrictModel):
    """How a preprocessing replica reads a study."""

    dicom_header_processes: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Processes each preprocessing replica parses a DICOM series' headers in (pydicom's parser holds "
        "a process's GIL: about 1 ms a file on one core). 0: in the replica itself. Default: a quarter of the "
        "node's cores, at most 8 (0 on a node of fewer than 4).",
    )

    def header_processes(self) -> int:
        """``dicom_header_processes``, its default resolved on this node."""
        if self.dicom_header_processes is not None:
            return self.dicom_header_processes
        return min(8, (os.cpu_count() or 1) // 4)


def default_storage_root() -> Path:
    """A folder only medserve's user can claim: ``/var/lib/medserve`` as root, else ``$XDG_STATE_HOME/medserve``
    (``~/.local/state/medserve``). Never a world-writable folder such as ``/tmp``, where another local user could
    create it first and own what medserve writes there."""
    if os.geteuid() == 0:
        return Path("/var/lib/medserve")
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "medserve"


class StorageConfig(StrictModel):
    """Where uploads are spooled and results kept.

    On a multi-node cluster this must be a filesystem every node mounts (NFS, a PVC):
    any ingress replica serves any result.
    """

    root: Path = Field(
        default_factory=default_storage_root,
        description="Folder of uploads/, results/, audit/ and medserve's own state; shared on a cluster. Created 0700; "
        "medserve refuses to start on one owned by another user or writable by others. Default: /var/lib/medserve "
        "as root, else $XDG_STATE_HOME/medserve (~/.local/state/medserve).",
    )
    uploads_root: Path | None = Field(
        None,
        description="Folder requests' bodies are spooled to until preprocessing has read them; default "
        "<root>/uploads. On one node a RAM-backed folder (a tmpfs such as /dev/shm/medserve) spares the disk "
        "gigabytes a second of writes under load; on a cluster it must be shared like root.",
    )
    result_retention_hours: float = Field(
        24.0,
        gt=0,
        description="Hours a result stays downloadable, counted from when it was made (reviews do not extend it); "
        "then it is deleted.",
    )
    sweep_interval_s: float = Field(
        600.0,
        gt=0,
        le=86400,
        description="Seconds between sweeps that delete what is past its retention (results, WSI uploads and "
        "outputs) and the upload folders of requests whose ingress died. Each ingress replica sweeps, idle or not.",
    )

    @property
    def uploads(self) -> Path:
        return self.uploads_root or self.root / "uploads"

    @property
    def results(self) -> Path:
        return self.root / "results"


# What decodes a slide's JPEG tiles on a GPU (``serve_app.wsi.cuda_regions``).
GpuJpegDecoder = Literal["hardware", "hybrid", "torchvision"]


class WsiConfig(StrictModel):
    """Whole-slide-image jobs: which slides may be read, where results go, how a job paces itself.

    Slides and outputs must be on storage every node mounts. A slide a request names is read only if it
    resolves (symlinks followed) inside one of ``slide_roots``, or the tenant uploaded it.
    """

    slide_roots: list[Path] = Field(
        [],
        description="Folders slides may be read from on an open server (no tenants); none: only slides uploaded "
        "through the API. With tenants, each has its own (tenants.<id>.wsi_slide_roots) and this must be empty.",
    )
    output_root: Path | None = Field(
        None,
        description="Job records (jobs/), uploaded slides and each tenant's outputs (<tenant>/<out>/<slide>/); "
        "null: <storage.root>/wsi.",
    )
    max_upload_bytes: int = Field(20 * 1024**3, gt=0, description="Largest slide one upload may send.")
    retention_days: float = Field(
        30.0,
        gt=0,
        description="Days an uploaded slide, and a job's record and outputs, are kept: an upload from when it was "
        "received, a job from when it ended (a job resumed into the same out keeps the folder for the newest). "
        "Then they are deleted.",
    )
    chunk_tiles: int = Field(
        16,
        ge=1,
        le=256,
        description="A work unit is chunk_tiles x chunk_tiles model tiles: one read, one heatmap chunk.",
    )
    chunks_in_flight: int = Field(
        16, ge=1, le=4096, description="Work units one job keeps sent to the tile model's replicas: its backlog."
    )
    slides_in_flight: int = Field(4, ge=1, le=256, description="Slides one job reads at once.")
    job_drivers: int = Field(
        2,
        ge=1,
        le=64,
        description="Long-lived Ray actors that run WSI jobs, started with the application: each runs several "
        "jobs at once, so a job starts without starting a process.",
    )
    chunk_attempts: int = Field(
        3, ge=1, le=20, description="Tries of a work unit whose replica died, before its slide fails."
    )
    min_tissue_fraction: float = Field(
        0.25, ge=0, le=1, description="A tile is classified when at least this fraction of it is tissue."
    )
    read_threads: int = Field(4, ge=1, le=256, description="Threads of a tile-model replica that read and decode.")
    region_threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A tile belongs to a tumour region (regions.geojson, the DICOM annotations) when its probability "
        "is at least this.",
    )
    region_min_area_um2: float = Field(
        20_000.0,
        ge=0,
        description="Tumour regions smaller than this (µm², holes excluded) are specks and left out; the default "
        "drops a lone tile of the embedded model (112 µm square: 12,544 µm²) and keeps two side by side.",
    )
    gpu_decode: bool = Field(
        True, description="A tile-model replica with a GPU decodes the slides' JPEG tiles there (nvJPEG), not on CPUs."
    )
    gpu_jpeg_decoder: GpuJpegDecoder = Field(
        "torchvision",
        description="What decodes the JPEG tiles on a replica's GPU (with gpu_decode): 'torchvision' (torchvision's "
        "nvJPEG: the least CPU a tile), 'hardware' (nvImageCodec on the GPU's JPEG engines: libjpeg-turbo's exact "
        "pixels) or 'hybrid' (nvImageCodec, Huffman decoding on CPU threads: the most tiles/s, the most CPU). The "
        "nvImageCodec ones need the gpu extra (docs/decoding.md).",
    )
    max_running_jobs_per_tenant: int = Field(
        4, ge=1, description="Jobs of one tenant queued or running at once; more get a 429."
    )

    @property
    def jobs(self) -> Path:
        return self.output_root / "jobs"

    def tenant_folder(self, tenant_id: str) -> Path:
        return self.output_root / tenant_id

    def uploads(self, tenant_id: str) -> Path:
        return self.output_root / tenant_id / "uploads"


class HttpConfig(StrictModel):
    """Where the API listens, and what carries requests to the ingress replicas."""

    host: str = Field("127.0.0.1", description="Address the API listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")
    allow_open: bool = Field(
        False,
        description="Whether an application with no tenants (every request anonymous, no API key) may listen "
        "beyond loopback. Off: `medserve up` and `medserve cluster render` refuse such a config, since anyone "
        "who reaches the port could then send studies, list every WSI job and download every result.",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host header values (without port) the API answers; others get 400 (a DNS-rebinding page "
        "cannot reach a loopback server). null: the configured host, localhost, 127.0.0.1 and ::1. '*' allows "
        "any (behind a proxy that checks it).",
    )
    ingress: Literal["haproxy", "proxy"] = Field(
        "haproxy",
        description="haproxy: Ray Serve's HAProxy ingress, which hands each request's bytes straight to an ingress "
        "replica (a 157 MB upload several times faster than through the proxy; plain HTTP: terminate TLS in front "
        "of it). proxy: Serve's Python HTTP proxy actor. Takes effect where Ray starts: `medserve up` sets it for "
        "the clusters it starts; elsewhere start Ray with ray_environment() (README: Ingress).",
    )
    throughput_optimized: bool = Field(
        False,
        description="Ray Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED): replicas run request "
        "code on their own event loop, not a second thread's, and call one another over gRPC. Off: it made a "
        "replica that only receives 157 MB uploads a third cheaper, but not medserve's ingress, which spools them "
        "(HTTP raw NIfTI on the H200: 26.9/s with it, 28.5/s without, in one run; README: Ingress). Set where "
        "Ray starts, as ingress is; off is written out, so that a shell exporting it does not turn it on.",
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode",
        description="Where Serve runs its ingress (HAProxy or proxy): on every node, so a load balancer in front "
        "may use any; or on the head only. Several nodes on one machine share its address and need HeadOnly.",
    )

    @property
    def loopback(self) -> bool:
        """Whether the API listens on a loopback address only."""
        return is_loopback(self.host)

    def host_allow_list(self) -> list[str]:
        """``allowed_hosts``, its default resolved: the Host header values the API answers."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        return sorted({self.host, "localhost", "127.0.0.1", "::1"} - {"0.0.0.0", "::"})

    def serve_start_options(self) -> dict[str, Any]:
        """Keyword arguments for ``serve.start``: where the ingress listens, and on which nodes."""
        return {"http_options": {"host": self.host, "port": self.port}, "proxy_location": self.proxy_location}

    def ray_environment(self) -> dict[str, str]:
        """The environment variables Ray must start with (``ray start``, ``ray.init``) for this ingress and data
        plane."""
        return {
            "RAY_SERVE_ENABLE_HA_PROXY": "1" if self.ingress == "haproxy" else "0",
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if self.throughput_optimized else "0",
        }


GRPC_SERVICER_FUNCTION = "tritonclient.grpc.service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
"""What registers the Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``) with Serve's gRPC
servers: the stubs NVIDIA's tritonclient ships, compiled from the protocol's own grpc_service.proto."""


class GrpcConfig(StrictModel):
    """The Open Inference Protocol over gRPC (KServe v2's ``inference.GRPCInferenceService``, which tritonclient.grpc
    calls), served by Ray Serve's gRPC ingress beside the HTTP API (docs: Inference protocol)."""

    enabled: bool = Field(
        False,
        description="Whether the gRPC service is served. Off (the default): no gRPC port is opened. It takes effect "
        "when Serve starts on the cluster (`medserve up` on a fresh cluster), as Serve's gRPC options do.",
    )
    port: int = Field(
        9000,
        ge=1,
        le=65535,
        description="Port the gRPC service listens on, at http.host: Ray's ingress binds its HTTP and gRPC ports "
        "on one address.",
    )
    max_receive_message_length: int = Field(
        2**31 - 1,
        ge=4 * 1024**2,
        le=2**31 - 1,
        description="Bytes of the largest message an ingress replica's gRPC server takes (a ModelInfer request, its "
        "volume in it); a larger one is refused RESOURCE_EXHAUSTED before medserve reads it. The default, 2 GiB - 1, "
        "is protobuf's largest message: a 512x512x2000 CT in int16 is 1 GiB. The upload limit "
        "(limits.max_upload_bytes, or the tenant's) applies to the message as to an HTTP body.",
    )

    def serve_start_options(self) -> dict[str, Any]:
        """Keyword arguments for ``serve.start`` (with ``HttpConfig.serve_start_options``'): Serve's gRPC options
        with the inference service; none while the service is off, so that Serve opens no gRPC port."""
        if not self.enabled:
            return {}
        return {"grpc_options": {"port": self.port, "grpc_servicer_functions": [GRPC_SERVICER_FUNCTION]}}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RayConfig(StrictModel):
    """The Ray cluster `medserve up` starts on this node. Always with Ray's token authentication
    (``RAY_AUTH_MODE=token``): the token is made once, kept 0600 in ``<storage.root>/state/ray-auth-token``
    (or taken from ``RAY_AUTH_TOKEN``), and every medserve command that talks to Ray uses it."""

    node_ip_address: str = Field(
        "127.0.0.1",
        description="Address Ray's own ports (GCS, raylet, object store, dashboard) bind to on a single node: "
        "loopback, so that nothing of Ray is reachable from the network. A node of a multi-node cluster needs "
        "its routable address (see docs: Security).",
    )
    port: int = Field(
        6379,
        ge=1024,
        le=65535,
        description="Port of the head's GCS: the address other nodes and medserve's commands join (Ray's default).",
    )
    client_server_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the Ray Client server (ray://); null: not started. It runs any code a token holder "
        "sends: start it only where a remote driver needs it.",
    )


class NodeGroupConfig(StrictModel):
    """One kind of node of a cluster: what each node has, and how many there may be."""

    cpus: int = Field(16, ge=1, description="CPU cores of each node (its pods' requests and limits).")
    memory: str = Field(
        "64Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)$", description="Memory of each node, as Kubernetes writes it."
    )
    gpus: int = Field(0, ge=0, le=16, description="GPUs of each node (nvidia.com/gpu).")
    min_nodes: int = Field(1, ge=0, description="Nodes the autoscaler keeps.")
    max_nodes: int = Field(1, ge=1, description="Nodes the autoscaler may start.")

    @model_validator(mode="after")
    def _min_within_max(self) -> NodeGroupConfig:
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) is more than max_nodes ({self.max_nodes})")
        return self


class ClusterConfig(StrictModel):
    """A multi-node deployment: what `medserve cluster render` writes a KubeRay RayService and a Ray
    cluster-launcher file from (README: Running on a cluster). Not read by `medserve up`."""

    image: str = Field(
        "medserve:0.1.0",
        description="Container image every pod runs: Ray 2.60's image with medserve installed "
        "(FROM rayproject/ray:2.60.0-py311-gpu; pip install medserve).",
    )
    head: NodeGroupConfig = Field(
        NodeGroupConfig(cpus=4, memory="16Gi"),
        description="The head node: Serve's controller and HAProxy ingress, no model replicas (num-cpus 0 for tasks).",
    )
    gpu_workers: NodeGroupConfig = Field(
        NodeGroupConfig(cpus=16, memory="64Gi", gpus=1, min_nodes=1, max_nodes=4),
        description="The GPU worker group the Ray autoscaler scales between min_nodes and max_nodes.",
    )
    redis_address: str | None = Field(
        "redis:6379",
        description="host:port of the Redis that keeps the GCS's state (head fault tolerance); null: none, the "
        "cluster is lost with its head.",
    )
    redis_password_secret: str | None = Field(
        "medserve-redis",
        description="Kubernetes Secret holding Redis's password under the key 'password'; the cluster launcher "
        "copies it from a file redis-password beside its own file instead. null: Redis without a password.",
    )
    ray_auth_token_secret: str = Field(
        "medserve-ray-token",
        description="Kubernetes Secret holding Ray's authentication token under the key 'auth_token' (the key "
        "KubeRay reads): every Ray container starts with RAY_AUTH_MODE=token and this token, and KubeRay's "
        "operator sends it to the head's dashboard. Create it once, with a random token: kubectl create secret "
        "generic medserve-ray-token --from-literal=auth_token=$(openssl rand -hex 32). The cluster launcher "
        "copies the token from a file ray-auth-token beside its own file instead.",
    )
    kuberay_operator_namespace: str = Field(
        "default",
        description="Namespace of KubeRay's operator (where its Helm chart or kustomization installed it, "
        "'default' unless told otherwise): the NetworkPolicy lets its pods, and no others from outside the "
        "cluster's own, reach the head's dashboard port, through which it deploys the Serve config. An operator "
        "that reaches the dashboard through the API server's proxy (useKubernetesProxy) needs that proxy's "
        "address allowed instead.",
    )
    metrics_scrape_namespace: str | None = Field(
        None,
        description="Namespace whose pods (Prometheus) may scrape Ray's metrics port (8080) of every pod; null: "
        "none from outside the cluster's own pods.",
    )
    shared_volume_claim: str = Field(
        "medserve-shared", description="PersistentVolumeClaim (ReadWriteMany) mounted by every pod at storage.root."
    )
    shared_volume_size: str = Field("500Gi", pattern=r"^[0-9]+(Mi|Gi|Ti)$", description="Size of that claim.")
    storage_class: str | None = Field(
        None, description="StorageClass of that claim (one that offers ReadWriteMany: NFS, CephFS); null: default."
    )
    head_ip: str = Field("10.0.0.10", description="Cluster launcher (on-premises nodes): the head node's address.")
    worker_ips: list[str] = Field(
        ["10.0.0.11", "10.0.0.12"], description="Cluster launcher: the GPU worker nodes' addresses."
    )
    ssh_user: str = Field("medserve", description="Cluster launcher: the user it logs in to the nodes as.")


class AppConfig(StrictModel):
    """Everything a medserve application is: models, resources, batching, limits, tenants."""

    name: str = Field("medserve", description="The Serve application's name.")
    layout: Literal["auto", "split", "fused"] = Field(
        "auto",
        description="split: preprocess, model and postprocess are separate deployments (host arrays between "
        "them). fused: one deployment per model runs all three, so tensors stay on its GPU; it takes "
        "deployments.model's resources. auto: fused when model replicas get a GPU, else split.",
    )
    model_repository: Path = Field(
        EMBEDDED_MODEL_REPOSITORY,
        description="Folder with one sub-folder per model, each with a model.yaml; relative to the config file. "
        "Default: the embedded repository.",
    )
    models: dict[str, ModelDeploymentConfig] = Field(
        {}, description="Per-model overrides of deployments.model, keyed by model name."
    )
    rollouts: dict[str, RolloutConfig] = Field(
        {},
        description="Per model (keyed by its name), a candidate version tried in shadow or as a canary before it "
        "is promoted (docs/rollouts.md).",
    )
    deployments: DeploymentsConfig = Field(DeploymentsConfig(), description="Resources of each deployment.")
    limits: LimitsConfig = Field(LimitsConfig(), description="What one request may send.")
    reading: ReadingConfig = Field(ReadingConfig(), description="How preprocessing replicas read studies.")
    storage: StorageConfig = Field(StorageConfig(), description="Where uploads and results are kept.")
    http: HttpConfig = Field(HttpConfig(), description="Where the API listens.")
    grpc: GrpcConfig = Field(
        GrpcConfig(), description="The Open Inference Protocol over gRPC; off unless enabled (docs: Inference protocol)"
    )
    ray: RayConfig = Field(RayConfig(), description="The Ray cluster `medserve up` starts on this node.")
    gpu_sharing: Literal["time-slicing", "mps"] = Field(
        "time-slicing",
        description="How replicas with fractional num_gpus share a GPU. mps: `medserve up` starts NVIDIA's MPS "
        "control daemon on a GPU node before Ray, so several replicas' kernels run at once (README: GPU sharing); "
        "time-slicing: CUDA's default, the replicas take turns.",
    )
    tenants: dict[TenantId, TenantConfig] = Field(
        {},
        description="Hospitals, keyed by tenant id. None configured: an open server, every request tenant "
        "anonymous (see README, Tenants, quotas and audit).",
    )
    scheduling: SchedulingConfig = Field(SchedulingConfig(), description="Processing slots and leases (tenants).")
    wsi: WsiConfig = Field(WsiConfig(), description="Whole-slide-image jobs: slide roots, outputs, pacing.")
    pacs: dict[PacsName, PacsConfig] = Field(
        {},
        description="DICOMweb servers (PACS) studies may be retrieved from and results stored to, keyed by the "
        "name requests use (see README, PACS).",
    )
    audit: AuditConfig = Field(AuditConfig(), description="The audit log's files.")
    input_monitoring: InputMonitoringConfig = Field(
        InputMonitoringConfig(), description="Input monitoring: the window of inputs a drift score is computed over."
    )
    dicom_network: DicomNetworkConfig | None = Field(
        None, description="medserve as a DICOM node (C-STORE listener); null: nothing listens (docs/dicom-network.md)."
    )
    routes: dict[RouteName, RouteConfig] = Field(
        {}, description="Rules that pick the model of a series received without one, and where its results go."
    )
    destinations: dict[DestinationName, DestinationConfig] = Field(
        {}, description="Where routed series' results are delivered: a PACS by C-STORE, or a pacs server by STOW-RS."
    )
    cluster: ClusterConfig = Field(
        ClusterConfig(), description="Multi-node deployments: what `medserve cluster render` writes manifests from."
    )

    @model_validator(mode="after")
    def _keys_are_unique(self) -> AppConfig:
        owners: dict[str, list[str]] = {}
        for tenant_id, tenant in self.tenants.items():
            for key_hash in tenant.api_key_hashes:
                owners.setdefault(key_hash, []).append(tenant_id)
        shared = sorted({", ".join(ids) for ids in owners.values() if len(ids) > 1})
        if shared:
            raise ValueError(
                f"tenants: one API key hash is listed twice (by {'; '.join(shared)}); a key names one tenant"
            )
        return self

    @model_validator(mode="after")
    def _dicom_network_refers_to_what_exists(self) -> AppConfig:
        check_against(self)
        return self

    @model_validator(mode="after")
    def _pacs_tenants_exist(self) -> AppConfig:
        for name, pacs in self.pacs.items():
            if self.tenants and pacs.tenants is None:
                raise ValueError(
                    f"pacs.{name}.tenants is not set, but tenants are configured: list the tenants that may use this "
                    f'PACS (tenants: [{next(iter(self.tenants))}]), or tenants: ["*"] to share it with every tenant'
                )
            unknown = sorted(set(pacs.tenants or ()) - set(self.tenants) - {ALL_TENANTS})
            if unknown:
                raise ValueError(f"pacs.{name}.tenants names tenants that are not configured: {', '.join(unknown)}")
        return self

    @model_validator(mode="after")
    def _slide_roots_per_tenant(self) -> AppConfig:
        # One list for all would let any tenant read every slide in it, another hospital's included.
        if self.tenants and self.wsi.slide_roots:
            raise ValueError(
                f"wsi.slide_roots ({', '.join(str(r) for r in self.wsi.slide_roots)}) is for an open server only: "
                "with tenants configured, move each folder to tenants.<id>.wsi_slide_roots of the tenants that may "
                "read it"
            )
        return self

    @model_validator(mode="after")
    def _slide_roots_apart(self) -> AppConfig:
        # A job reads any file under its tenant's roots: a root holding medserve's storage would give it other
        # tenants' uploads and outputs, and two tenants' overlapping roots each other's slides.
        storage = {  # the innermost first: a root inside the outputs is named as such
            "wsi.output_root": self.wsi.output_root,
            "storage.uploads_root": self.storage.uploads,
            "storage.root": self.storage.root,
        }
        if self.audit.directory is not None:
            storage["audit.directory"] = self.audit.directory
        owned = [("wsi.slide_roots", root) for root in self.wsi.slide_roots] + [
            (f"tenants.{tenant_id}.wsi_slide_roots", root)
            for tenant_id, tenant in self.tenants.items()
            for root in tenant.wsi_slide_roots
        ]
        for i, (field, root) in enumerate(owned):
            for other_field, other in [*storage.items(), *owned[i + 1 :]]:
                if other_field != field and _overlap(root, other):
                    raise ValueError(
                        f"{field}: {root} overlaps {other_field} ({other}): a slide root may not hold, or lie "
                        "inside, medserve's storage or another tenant's slide root"
                    )
        return self

    @model_validator(mode="before")
    @classmethod
    def _wsi_output_under_storage(cls, raw: Any) -> Any:
        # wsi.output_root defaults to a folder of storage.root, whichever root is configured.
        if not isinstance(raw, dict):
            return raw
        wsi, storage = raw.get("wsi") or {}, raw.get("storage") or {}
        if not isinstance(wsi, dict) or not isinstance(storage, dict):
            return raw
        if "root" in storage and storage["root"] is None:  # null in the YAML: the default root
            storage = {key: value for key, value in storage.items() if key != "root"}
            raw = {**raw, "storage": storage}
        if wsi.get("output_root") is None:
            root = storage.get("root") or default_storage_root()
            raw = {**raw, "wsi": {**wsi, "output_root": Path(root) / "wsi"}}
        return raw

    @property
    def open_server(self) -> bool:
        """No tenants: every request is anonymous and needs no key."""
        return not self.tenants

    def open_server_refusal(self) -> str | None:
        """Why this config must not be served as it is (an open server reachable beyond loopback), or None."""
        if self.open_server and not self.http.loopback and not self.http.allow_open:
            return (
                f"http.host is {self.http.host} but no tenants are configured: anyone who reaches port "
                f"{self.http.port} could send studies, list every WSI job and download every result without a key. "
                "Configure tenants (medserve tenant-key), listen on 127.0.0.1, or set http.allow_open: true to "
                "accept that risk"
            )
        if self.open_server and self.grpc.enabled and not self.http.allow_open:
            return (
                "grpc.enabled is true but no tenants are configured: Ray 2.60's Serve proxy binds its gRPC port "
                "(grpc.port, or the fallback proxy's 9500 behind HAProxy) to every interface, whatever http.host says, "
                "so anyone who reaches it could send volumes and read masks without a key. Configure tenants "
                "(medserve tenant-key), or set http.allow_open: true to accept that risk"
            )
        return None

    def model_deployment(self, model_name: str) -> ModelDeploymentConfig:
        return self.models.get(model_name, self.deployments.model)

    @property
    def fused(self) -> bool:
        if self.layout != "auto":
            return self.layout == "fused"
        return any(m.num_gpus > 0 for m in (self.deployments.model, *self.models.values()))


def _overlap(a: Path, b: Path) -> bool:
    """Whether one folder is the other or holds it, symlinks followed."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a.is_relative_to(b) or b.is_relative_to(a)


class ConfigError(ValueError):
    """The configuration file is missing, not YAML, or has a bad field."""


def load_config(path: Path | str | None = None, overrides: dict | None = None) -> AppConfig:
    """Read and validate a YAML config; ``None`` means the default shipped with the package."""
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    if "model_repository" in raw and raw["model_repository"] is not None:
        raw["model_repository"] = (path.parent / raw["model_repository"]).resolve()
    elif "model_repository" in raw:
        del raw["model_repository"]
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"config {path} is invalid:\n{_describe(e)}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _describe(error: ValidationError) -> str:
    return "\n".join(f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
