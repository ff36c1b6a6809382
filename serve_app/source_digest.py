"""One digest of the code medserve runs: what tells a replica or a WSI job driver of new code from one of old."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import ray

__all__ = ["source_digest"]


@functools.cache
def source_digest() -> str:
    """SHA-256 (hex) of medserve's own Python source (``serve_app/`` and ``deployments/``) and Ray's version."""
    digest = hashlib.sha256(ray.__version__.encode())
    for package in (Path(__file__).parent, Path(__file__).parent.parent / "deployments"):
        for path in sorted(package.rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()
