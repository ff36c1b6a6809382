"""The dependencies medserve declares exclude versions with published vulnerabilities, and what is installed meets
every declared range (a stale environment, or a floor lowered by mistake, fails here rather than in a review)."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# (package, the newest vulnerable version, the advisory): the declared range must exclude that version.
VULNERABLE = [
    ("torch", "2.5.1", "CVE-2025-32434: torch.load(weights_only=True) runs code"),
    ("starlette", "0.49.0", "CVE-2025-62727: Range header denial of service in FileResponse"),
    ("starlette", "0.39.2", "CVE-2024-47874: multipart form fields without a size limit"),
    ("python-multipart", "0.0.17", "CVE-2024-53981: CPU spent on crafted boundaries"),
    ("requests", "2.32.3", "CVE-2024-47081: .netrc credentials sent to another host"),
    ("pillow", "11.2.1", "CVE-2025-48379: buffer overflow writing DDS"),
]


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["test"]
    requirements = (Requirement(line) for line in lines)
    return {requirement.name.lower(): requirement for requirement in requirements}


@pytest.mark.parametrize(("package", "vulnerable", "advisory"), VULNERABLE)
def test_declared_range_excludes_the_vulnerable_version(package, vulnerable, advisory):
    requirement = _declared().get(package)
    assert requirement is not None, f"{package} is not declared in pyproject.toml, so nothing bounds it ({advisory})"
    assert not requirement.specifier.contains(Version(vulnerable), prereleases=True), (
        f"{package}{requirement.specifier} admits {vulnerable} ({advisory})"
    )


def test_installed_versions_meet_the_declared_ranges():
    unmet = []
    for name, requirement in _declared().items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        installed = Version(metadata.version(name))
        # A local build (2.13.0+cpu) satisfies the range its public version does.
        if not requirement.specifier.contains(Version(installed.public), prereleases=True):
            unmet.append(f"{name} {installed} (declared {requirement.specifier})")
    assert not unmet, "installed versions outside the declared ranges: " + "; ".join(unmet)


def test_every_third_party_import_of_the_product_is_declared():
    """A module the product imports is one the package declares (directly): ``requests`` once was not."""
    declared = set(_declared())
    imported_as = {"requests": "requests", "python_multipart": "python-multipart", "starlette": "starlette"}
    sources = [p.read_text() for root in ("serve_app", "deployments") for p in (PYPROJECT.parent / root).rglob("*.py")]
    for module, package in imported_as.items():
        if any(f"import {module}" in s or f"from {module}" in s for s in sources):
            assert package in declared, f"the product imports {module} but pyproject.toml does not declare {package}"
