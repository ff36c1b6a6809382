"""Compose the medserve application from its config: ingress -> preprocess -> model -> postprocess
(split layout), or ingress -> fused pipeline (fused layout), for segmentation models; one autoscaled
tile-model deployment per tile classifier, which WSI jobs' drivers feed; with a ``dicom_network`` section, the
DICOM node (one replica listening for C-STORE, its routed series through the same stages). Every version of
every model in the repository gets its own model deployment (``ModelReplica:<name>`` or
``ModelReplica:<name>:<version>``).

    serve run serve_app.app:app_builder config=path/to/config.yaml

Deploying again (``medserve up`` or ``medserve reload`` on a running cluster) restarts only the deployments whose
code, config or model changed: each deployment's Serve version is a digest of medserve's source, its options and
what it is given (a model's spec carries the digest of its folder's files). Serve would otherwise give every
deployment a new random version on each ``serve.run`` and restart them all. Replaced replicas finish their
requests in flight first (graceful shutdown, for as long as a request may last).
"""

from __future__ import annotations

import hashlib
import os

from ray.serve import Application
from ray.serve.deployment import Deployment

from deployments.dicom_node import DicomNodeDeployment
from deployments.fused_pipeline import FusedPipelineDeployment
from deployments.gate import TenantGateDeployment
from deployments.ingress import IngressDeployment
from deployments.model import ModelDeployment
from deployments.postprocess import PostprocessDeployment
from deployments.preprocess import PreprocessDeployment
from deployments.tile_model import TileModelDeployment
from serve_app.config import CONFIG_ENVIRONMENT_VARIABLE, AppConfig, load_config
from serve_app.engines.torch_engine import check_network
from serve_app.model_repository import ModelRepository, ModelRepositoryError
from serve_app.segmentation.rollouts import check_rollouts
from serve_app.source_digest import source_digest

__all__ = ["app_builder", "build_app", "read_checked_repository"]


def read_checked_repository(config: AppConfig) -> ModelRepository:
    """The config's model repository, every model's network built with its weights and run once
    (``check_network``): a model that fails is refused, with its reason, and the others are served."""
    repository = ModelRepository(config.model_repository)  # fails here, at start, when no model can be read
    for spec in list(repository):
        try:
            check_network(spec)
        except ModelRepositoryError as e:
            repository.refuse(spec, str(e))
    return repository


def build_app(config: AppConfig, repository: ModelRepository | None = None) -> Application:
    """The application; ``repository``: the config's, read and checked (``read_checked_repository``) unless given."""
    repository = repository or read_checked_repository(config)
    check_rollouts(config, repository)
    model_deployment = FusedPipelineDeployment if config.fused else ModelDeployment
    graceful = {"graceful_shutdown_timeout_s": _longest_request_s(config)}
    model_handles, tile_model_handles = {}, {}
    for spec in repository:
        if spec.task == "tile_classification":
            tile_model_handles[spec.key] = _versioned(
                TileModelDeployment,
                (spec, config),
                name=f"{TileModelDeployment.name}:{spec.key}",
                **config.deployments.tile_model.serve_options(),
            ).bind(spec, config)
            continue
        resources = config.model_deployment(spec.name)
        model_handles[spec.key] = _versioned(
            model_deployment,
            (spec, config),
            name=f"{model_deployment.name}:{spec.key}",
            user_config=resources.batching.model_dump(),
            **graceful,
            **resources.serve_options(),
        ).bind(spec, config)
    ingress_args = (config, repository, sorted(model_handles), sorted(tile_model_handles))
    ingress = _versioned(IngressDeployment, ingress_args, **graceful, **config.deployments.ingress.serve_options())
    # An open server has no quotas to count. The gate's counts live in it: it is redeployed only when config changes.
    gate = _versioned(TenantGateDeployment, (config,)).bind(config) if config.tenants else None
    if config.fused:
        node = _dicom_node(config, repository, model_handles, None, None, gate)
        return ingress.bind(config, repository, model_handles, tile_model_handles, gate=gate, dicom_node=node)
    stage_options = {"graceful_shutdown_timeout_s": graceful["graceful_shutdown_timeout_s"]}
    preprocess = _versioned(
        PreprocessDeployment, (config,), **stage_options, **config.deployments.preprocess.serve_options()
    ).bind(config)
    postprocess = _versioned(
        PostprocessDeployment, (config,), **stage_options, **config.deployments.postprocess.serve_options()
    ).bind(config)
    node = _dicom_node(config, repository, model_handles, preprocess, postprocess, gate)
    stages = (preprocess, postprocess, gate)
    return ingress.bind(config, repository, model_handles, tile_model_handles, *stages, dicom_node=node)


def _dicom_node(config: AppConfig, repository: ModelRepository, model_handles: dict, *stages) -> Deployment | None:
    """The DICOM node over the segmentation models' stages (``stages``: preprocess, postprocess, gate; None where
    the layout or config has none), when ``dicom_network`` is configured. Its graceful shutdown waits for the
    series it is processing (as long as a request may last), its deliveries then stop; what is left waits on disk."""
    if config.dicom_network is None:
        return None
    given = (config, repository, sorted(model_handles))
    graceful = {"graceful_shutdown_timeout_s": _longest_request_s(config)}
    return _versioned(DicomNodeDeployment, given, **graceful).bind(config, repository, model_handles, *stages)


def _versioned(deployment: Deployment, given: tuple, **options) -> Deployment:
    """``deployment`` with ``options`` and a Serve version that changes exactly when its code, options or what it
    is given (``given``: pydantic models, repositories, lists of names) change.

    Serve restarts a deployment's replicas on a new deployment only when its version changes; its public API
    leaves the version to Serve, which picks a random one on every ``serve.run``: hence ``_internal``.
    """
    digest = hashlib.sha256(source_digest().encode())
    digest.update(repr(sorted(options.items())).encode())
    for part in given:
        digest.update(_described(part).encode())
    return deployment.options(version=digest.hexdigest()[:32], _internal=True, **options)


def _described(part) -> str:
    if isinstance(part, ModelRepository):
        return repr([spec.model_dump_json() for spec in part]) + repr([r.model_dump_json() for r in part.refused])
    if hasattr(part, "model_dump_json"):
        return part.model_dump_json()
    return repr(part)


def _longest_request_s(config: AppConfig) -> float:
    """The longest a segment request may take (the server's deadline, or a tenant's): replaced replicas wait this
    long for their requests in flight."""
    deadlines = [config.limits.request_deadline_s, *(t.request_deadline_s or 0 for t in config.tenants.values())]
    return max(deadlines)


def app_builder(args: dict | None = None) -> Application:
    """Entry point for ``serve run`` / ``serve deploy`` config files: ``args: {config: PATH}``; without it, the YAML
    that ``$MEDSERVE_CONFIG`` names where Ray started (nodes started by the cluster launcher), else the packaged one."""
    return build_app(load_config((args or {}).get("config") or os.environ.get(CONFIG_ENVIRONMENT_VARIABLE)))
