"""Engines run a model's network on a batch: torch tensor in, logits out, on one device."""

from serve_app.engines.base import Engine, load_engine

__all__ = ["Engine", "load_engine"]
