"""The one configuration model of a medserve application.

YAML in, validated once at start; a bad field fails with a message that names it
(``deployments.model.num_gpus: Input should be less than or equal to 8``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve_app.tenancy.config import AuditConfig, SchedulingConfig, TenantConfig, TenantId

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.yaml")
EMBEDDED_MODEL_REPOSITORY = Path(__file__).with_name("models")


class _Strict(BaseModel):
    # A misspelt key is a bad field, not a silently ignored one.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class DeploymentConfig(_Strict):
    """Resources and scaling of one Serve deployment."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: Optional[AutoscalingConfig] = None
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0, le=8)
    max_ongoing_requests: int = Field(8, ge=1)

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class BatchingConfig(_Strict):
    max_batch_size: int = Field(4, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)

    def apply_to(self, batched_method) -> None:
        """Retune a live ``@serve.batch`` method (from a deployment's ``reconfigure``)."""
        batched_method.set_max_batch_size(self.max_batch_size)
        batched_method.set_batch_wait_timeout_s(self.batch_wait_timeout_s)


class ModelDeploymentConfig(DeploymentConfig):
    batching: BatchingConfig = BatchingConfig()


class DeploymentsConfig(_Strict):
    ingress: DeploymentConfig = DeploymentConfig(num_cpus=0.25, max_ongoing_requests=64)
    preprocess: DeploymentConfig = DeploymentConfig()
    model: ModelDeploymentConfig = ModelDeploymentConfig()
    postprocess: DeploymentConfig = DeploymentConfig()


class LimitsConfig(_Strict):
    # A 512x512x2000 CT is about 1 GB of int16; the defaults admit it, not more.
    max_upload_bytes: int = Field(2 * 1024**3, gt=0)
    max_volume_voxels: int = Field(512 * 512 * 2000, gt=0)
    max_files_per_upload: int = Field(10_000, gt=0)


class StorageConfig(_Strict):
    """Where uploads are spooled and results kept.

    On a multi-node cluster this must be a filesystem every node mounts (NFS, a PVC):
    any ingress replica serves any result.
    """

    root: Path = Path("/tmp/medserve")
    result_retention_hours: float = Field(24.0, gt=0)

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def results(self) -> Path:
        return self.root / "results"


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class AppConfig(_Strict):
    """Everything a medserve application is: models, resources, batching, limits."""

    name: str = "medserve"
    # split: preprocess, model and postprocess are separate deployments (CPU arrays between them).
    # fused: one deployment per model runs all three, so tensors stay on its GPU; it takes
    # deployments.model's resources. auto: fused when model replicas get a GPU, else split.
    layout: Literal["auto", "split", "fused"] = "auto"
    model_repository: Path = EMBEDDED_MODEL_REPOSITORY
    # Per-model overrides of ``deployments.model``, keyed by model name.
    models: dict[str, ModelDeploymentConfig] = {}
    deployments: DeploymentsConfig = DeploymentsConfig()
    limits: LimitsConfig = LimitsConfig()
    storage: StorageConfig = StorageConfig()
    http: HttpConfig = HttpConfig()
    # Hospitals, keyed by tenant id. None configured: an open server (see README, "Tenants, quotas and audit").
    tenants: dict[TenantId, TenantConfig] = {}
    scheduling: SchedulingConfig = SchedulingConfig()
    audit: AuditConfig = AuditConfig()

    @model_validator(mode="after")
    def _keys_are_unique(self) -> "AppConfig":
        hashes = [h for tenant in self.tenants.values() for h in tenant.api_key_hashes]
        if len(hashes) != len(set(hashes)):
            raise ValueError("tenants: the same API key hash is listed twice")
        return self

    def model_deployment(self, model_name: str) -> ModelDeploymentConfig:
        return self.models.get(model_name, self.deployments.model)

    @property
    def fused(self) -> bool:
        if self.layout != "auto":
            return self.layout == "fused"
        return any(m.num_gpus > 0 for m in (self.deployments.model, *self.models.values()))


class ConfigError(ValueError):
    """The configuration file is missing, not YAML, or has a bad field."""


def load_config(path: Optional[Path | str] = None, overrides: Optional[dict] = None) -> AppConfig:
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
    return "\n".join(
        f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
    )
