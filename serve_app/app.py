"""Compose the medserve application from its config: ingress -> preprocess -> model -> postprocess
(split layout), or ingress -> fused pipeline (fused layout), for segmentation models; one autoscaled
tile-model deployment per tile classifier, which WSI jobs' drivers feed.

    serve run serve_app.app:app_builder config=path/to/config.yaml
"""

from __future__ import annotations

import os

from ray.serve import Application

from deployments.fused_pipeline import FusedPipelineDeployment
from deployments.gate import TenantGateDeployment
from deployments.ingress import IngressDeployment
from deployments.model import ModelDeployment
from deployments.postprocess import PostprocessDeployment
from deployments.preprocess import PreprocessDeployment
from deployments.tile_model import TileModelDeployment
from serve_app.config import CONFIG_ENVIRONMENT_VARIABLE, AppConfig, load_config
from serve_app.model_repository import ModelRepository

__all__ = ["app_builder", "build_app"]


def build_app(config: AppConfig) -> Application:
    repository = ModelRepository(config.model_repository)  # fail here, at start, on a bad model.yaml
    model_deployment = FusedPipelineDeployment if config.fused else ModelDeployment
    model_handles, tile_model_handles = {}, {}
    for spec in repository:
        if spec.task == "tile_classification":
            tile_model_handles[spec.name] = TileModelDeployment.options(
                name=f"{TileModelDeployment.name}:{spec.name}", **config.deployments.tile_model.serve_options()
            ).bind(spec.name, config)
            continue
        resources = config.model_deployment(spec.name)
        model_handles[spec.name] = model_deployment.options(
            name=f"{model_deployment.name}:{spec.name}",
            user_config=resources.batching.model_dump(),
            **resources.serve_options(),
        ).bind(spec.name, config)
    ingress = IngressDeployment.options(**config.deployments.ingress.serve_options())
    gate = TenantGateDeployment.bind(config) if config.tenants else None  # an open server has no quotas to count
    if config.fused:
        return ingress.bind(config, model_handles, tile_model_handles, gate=gate)
    preprocess = PreprocessDeployment.options(**config.deployments.preprocess.serve_options()).bind(config)
    postprocess = PostprocessDeployment.options(**config.deployments.postprocess.serve_options()).bind(config)
    return ingress.bind(config, model_handles, tile_model_handles, preprocess, postprocess, gate)


def app_builder(args: dict | None = None) -> Application:
    """Entry point for ``serve run`` / ``serve deploy`` config files: ``args: {config: PATH}``; without it, the YAML
    that ``$MEDSERVE_CONFIG`` names where Ray started (nodes started by the cluster launcher), else the packaged one."""
    return build_app(load_config((args or {}).get("config") or os.environ.get(CONFIG_ENVIRONMENT_VARIABLE)))
