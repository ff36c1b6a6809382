"""A model repository: a folder with one sub-folder per model, described by a ``model.yaml`` or a MONAI bundle.

Layout (both kinds of model, both layouts, side by side in one repository; a ``model.yaml`` is read by
``serve_app/model_spec.py``)::

    repo/<name>/model.yaml                   one version: the version its model.yaml names
    repo/<name>/configs/metadata.json        one version: a MONAI bundle (serve_app/monai_bundle.py)
    repo/<name>/<version>/model.yaml         several versions side by side; the folder's name is the version
    repo/<name>/<version>/configs/...        (the newest by PEP 440 ordering answers /v1/models/<name>/...)

A model that cannot be read is refused, with its file and reason (``ModelRepository.refused``); the others serve.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, Field

from serve_app.errors import ModelNotFound
from serve_app.model_spec import ModelRepositoryError, ModelSpec, read_model_spec
from serve_app.monai_bundle import read_bundle

# TRANSITIONAL, to delete in the same change that moves the last importers (segmentation/transforms.py,
# results/codes.py) onto serve_app.model_spec: their owners are editing them as this is written.
from serve_app.model_spec import CodeSpec, PreprocessingSpec  # noqa: E402, F401  isort: skip

__all__ = ["ModelRepository", "RefusedModel"]

logger = logging.getLogger(__name__)


class RefusedModel(BaseModel):
    """A model of the repository that is not served, and why."""

    name: str = Field(description="The model's folder name.")
    version: str | None = Field(description="Its version folder's name, in the versioned layout.")
    path: str = Field(description="Its folder, relative to the model repository.")
    reason: str = Field(description="Why it was refused: the file and the field or transform at fault.")


def _is_model_folder(folder: Path) -> bool:
    return (folder / "model.yaml").is_file() or (folder / "configs").is_dir()


def _folder_digest(folder: Path) -> str:
    """SHA-256 over the folder's files, names and contents, in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _version_order(spec: ModelSpec) -> Version:
    return Version(spec.version)


class ModelRepository:
    """The models of one repository folder, read and validated once.

    Every version of every model is read; one that cannot be is listed in ``refused`` (and logged) rather than
    failing the others. A repository where no model can be read is an error, naming each one's reason.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ModelRepositoryError(f"model repository {self.root} is not a folder")
        self._versions: dict[str, list[ModelSpec]] = {}  # newest first
        self.refused: list[RefusedModel] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if _is_model_folder(folder):
                self._add(folder, version=None)
            else:
                for version_folder in sorted(p for p in folder.iterdir() if p.is_dir() and _is_model_folder(p)):
                    self._add(version_folder, version=version_folder.name)
        for refused in self.refused:
            logger.warning("model %s refused: %s", refused.path, refused.reason)
        if not self._versions:
            reasons = "".join(f"\n{refused.reason}" for refused in self.refused)
            raise ModelRepositoryError(f"model repository {self.root} holds no usable model{reasons}")

    def _add(self, folder: Path, version: str | None) -> None:
        name = folder.parent.name if version else folder.name
        try:
            spec = self._read(folder, name, version)
        except ModelRepositoryError as e:
            self._refuse(folder, name, version, str(e))
            return
        versions = self._versions.setdefault(name, [])
        versions.append(spec)
        versions.sort(key=_version_order, reverse=True)

    @staticmethod
    def _read(folder: Path, name: str, version: str | None) -> ModelSpec:
        if (folder / "model.yaml").is_file() and (folder / "configs").is_dir():
            raise ModelRepositoryError(f"{folder}: holds both a model.yaml and a MONAI bundle's configs/; keep one")
        if (folder / "model.yaml").is_file():
            spec = read_model_spec(folder / "model.yaml")
            described_by = folder / "model.yaml"
        else:
            spec = read_bundle(folder, name)
            described_by = folder / "configs"
        if spec.name != name:
            raise ModelRepositoryError(f"{described_by}: name {spec.name!r} differs from its folder {name!r}")
        if version is not None and spec.version != version:
            raise ModelRepositoryError(f"{described_by}: version {spec.version!r} differs from its folder {version!r}")
        try:
            Version(spec.version)
        except InvalidVersion:
            raise ModelRepositoryError(
                f"{described_by}: version {spec.version!r} is not a version number (e.g. 1.2.0)"
            ) from None
        if not spec.weights_path.is_file():
            raise ModelRepositoryError(f"{described_by}: weights file {spec.weights.file} not found")
        return spec.model_copy(update={"versioned": version is not None, "digest": _folder_digest(folder)})

    def __iter__(self) -> Iterator[ModelSpec]:
        """Every version of every model served."""
        return (spec for versions in self._versions.values() for spec in versions)

    def names(self) -> list[str]:
        return list(self._versions)

    def versions(self, name: str) -> list[ModelSpec]:
        """The model's versions, newest first."""
        return self._versions[self.get(name).name]

    def get(self, name: str, version: str | None = None) -> ModelSpec:
        """The model's ``version``, or its newest."""
        versions = self._versions.get(name)
        if versions is None:
            refused = [r for r in self.refused if r.name == name]
            if refused:
                raise ModelNotFound(f"model {name!r} was refused when the server started: {refused[0].reason}")
            raise ModelNotFound(f"unknown model {name!r}; this server has {', '.join(self._versions)}")
        if version is None:
            return versions[0]
        for spec in versions:
            if spec.version == version:
                return spec
        served = ", ".join(spec.version for spec in versions)
        raise ModelNotFound(f"model {name!r} has no version {version!r}; this server has {served}")

    def refuse(self, spec: ModelSpec, reason: str) -> None:
        """Stop serving one version (a check after reading failed: its weights do not fit its network, say)."""
        versions = self._versions[spec.name]
        versions.remove(spec)
        if not versions:
            del self._versions[spec.name]
        self._refuse(spec.folder, spec.name, spec.version if spec.versioned else None, reason)
        logger.warning("model %s refused: %s", self.refused[-1].path, self.refused[-1].reason)

    def _refuse(self, folder: Path, name: str, version: str | None, reason: str) -> None:
        # Paths inside the repository, relative to it: the reason is shown to API clients too.
        reason = reason.replace(f"{self.root}/", "")
        path = str(folder.relative_to(self.root))
        self.refused.append(RefusedModel(name=name, version=version, path=path, reason=reason))
