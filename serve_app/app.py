"""Compose the medserve application from its config: ingress -> preprocess -> model -> postprocess
(split layout), or ingress -> fused pipeline (fused layout).

    serve run serve_app.app:app_builder config=path/to/config.yaml
"""

from __future__ import annotations

from typing import Optional

from ray.serve import Application

from deployments.fused_pipeline import FusedPipeline
from deployments.gate import TenantGate
from deployments.ingress import Ingress
from deployments.model import ModelReplica
from deployments.postprocess import Postprocess
from deployments.preprocess import Preprocess
from serve_app.config import AppConfig, load_config
from serve_app.model_repository import ModelRepository


def build_app(config: AppConfig) -> Application:
    repository = ModelRepository(config.model_repository)  # fail here, at start, on a bad model.yaml
    model_deployment = FusedPipeline if config.fused else ModelReplica
    models = {}
    for spec in repository:
        resources = config.model_deployment(spec.name)
        models[spec.name] = model_deployment.options(
            name=f"{model_deployment.name}:{spec.name}",
            user_config=resources.batching.model_dump(),
            **resources.serve_options(),
        ).bind(spec.name, config)
    ingress = Ingress.options(**config.deployments.ingress.serve_options())
    gate = TenantGate.bind(config) if config.tenants else None  # an open server has no quotas to count
    if config.fused:
        return ingress.bind(config, models, gate=gate)
    preprocess = Preprocess.options(**config.deployments.preprocess.serve_options()).bind(config)
    postprocess = Postprocess.options(**config.deployments.postprocess.serve_options()).bind(config)
    return ingress.bind(config, models, preprocess, postprocess, gate)


def app_builder(args: Optional[dict] = None) -> Application:
    """Entry point for ``serve run`` / ``serve deploy`` config files: ``args: {config: PATH}``."""
    return build_app(load_config((args or {}).get("config")))
