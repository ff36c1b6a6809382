"""``StrictModel``: the base of every section of the application config and of a ``model.yaml``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """A pydantic model that refuses unknown keys and cannot be changed once made.

    A misspelt key (``num_replica``) is a bad field, reported with its dotted name, not a setting silently
    ignored; frozen, because one config object is shared by every replica that receives it.
    """

    # protected_namespaces=(): fields named model_* (model_repository) are ours, not pydantic's.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
