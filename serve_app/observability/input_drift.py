"""A model's reference distribution of inputs, and the drift of its last inputs from it (population stability index).

The reference is a JSON file beside the model's files (``input_reference.json`` in its folder), made by
``medserve input-reference`` from reference studies or slides: for each feature of
``serve_app.observability.input_features``, its bins and how many reference inputs fell in each. A category
feature's bins are its categories; a value feature's are cut at the reference's deciles (fewer where deciles
coincide), from minus to plus infinity.

``InputMonitor`` keeps each model version's last ``window`` inputs (a replica's own; each replica that reads inputs
has one) and, after each input, computes per feature the population stability index of the window against the
reference::

    PSI = sum over bins of (recent - reference) * ln(recent / reference)

with each side's fractions taken after adding half an input to every bin (so an empty bin counts, but not as
infinity). 0 is the same distribution; under 0.1 is no real change, 0.1 to 0.25 a moderate one, over 0.25
(``DRIFT_THRESHOLD``) a shift worth a look.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, Field

from serve_app.observability.input_features import CATEGORY_FEATURES, InputFeatures, study_features
from serve_app.observability.metrics import record_input_drift

if TYPE_CHECKING:
    from serve_app.studies.volume import Volume

__all__ = [
    "DEFAULT_WINDOW",
    "DRIFT_THRESHOLD",
    "REFERENCE_FILE",
    "FeatureDrift",
    "FeatureReference",
    "InputMonitor",
    "InputReference",
    "build_reference",
    "drift",
    "input_monitor",
    "population_stability_index",
]

logger = logging.getLogger(__name__)

REFERENCE_FILE = "input_reference.json"
DEFAULT_WINDOW = 200
DRIFT_THRESHOLD = 0.25
# Added to every bin's count on both sides before fractions are taken.
SMOOTHING = 0.5
_DECILES = np.arange(10, 100, 10)


class FeatureReference(BaseModel):
    """One feature's bins and the reference inputs in each."""

    kind: Literal["category", "value"] = Field(description="category: bins are its values; value: numbers, cut.")
    bins: list[str] = Field(description="Each bin's label: a category, or an interval such as [35.1, 38.2).")
    edges: list[float] = Field(
        [], description="Value features: the cuts between bins (len(bins) - 1), in increasing order."
    )
    counts: list[int] = Field(description="Reference inputs in each bin.")

    def bin_of(self, value: str | float) -> str:
        if self.kind == "category":
            return str(value)
        return self.bins[int(np.searchsorted(self.edges, float(value), side="right"))]


class InputReference(BaseModel):
    """A model's reference distribution of inputs: what ``medserve input-reference`` writes beside its files."""

    model: str = Field(description="The model's name.")
    version: str = Field(description="The model version it was made for.")
    inputs: int = Field(ge=1, description="Reference studies or slides it was computed from.")
    features: dict[str, FeatureReference] = Field(description="Per feature, its bins and reference counts.")

    @classmethod
    def load(cls, folder: Path) -> InputReference | None:
        """The reference in a model's folder; None where it has none."""
        path = Path(folder) / REFERENCE_FILE
        if not path.is_file():
            return None
        return cls.model_validate_json(path.read_text())

    def save(self, folder: Path) -> Path:
        path = Path(folder) / REFERENCE_FILE
        path.write_text(json.dumps(self.model_dump(), indent=1) + "\n")
        return path


def build_reference(model: str, version: str, features: Sequence[InputFeatures]) -> InputReference:
    """The reference of ``features``, one dict per reference input."""
    if not features:
        raise ValueError("a reference needs at least one input")
    references = {}
    for name in features[0]:
        values = [f[name] for f in features]
        if name in CATEGORY_FEATURES:
            bins = sorted({str(v) for v in values})
            counts = [sum(str(v) == b for v in values) for b in bins]
            references[name] = FeatureReference(kind="category", bins=bins, counts=counts)
        else:
            numbers = np.asarray(values, dtype=np.float64)
            edges = sorted({float(f"{e:.4g}") for e in np.percentile(numbers, _DECILES)})
            bins = _interval_labels(edges)
            indices = np.searchsorted(edges, numbers, side="right")
            counts = [int(np.sum(indices == i)) for i in range(len(bins))]
            references[name] = FeatureReference(kind="value", bins=bins, edges=edges, counts=counts)
    return InputReference(model=model, version=version, inputs=len(features), features=references)


def _interval_labels(edges: Sequence[float]) -> list[str]:
    bounds = ["-inf", *(f"{e:g}" for e in edges), "inf"]
    return [f"[{low}, {high})" for low, high in zip(bounds, bounds[1:], strict=False)]


def smoothed_fractions(counts: Sequence[float]) -> list[float]:
    total = sum(counts) + SMOOTHING * len(counts)
    return [(c + SMOOTHING) / total for c in counts]


def population_stability_index(reference_counts: Sequence[float], recent_counts: Sequence[float]) -> float:
    """PSI of ``recent_counts`` against ``reference_counts`` (the same bins, in the same order)."""
    expected, actual = smoothed_fractions(reference_counts), smoothed_fractions(recent_counts)
    return float(sum((a - e) * math.log(a / e) for a, e in zip(actual, expected, strict=True)))


class FeatureDrift(BaseModel):
    """One feature of a model version's recent inputs against its reference."""

    psi: float
    bins: list[str]
    reference: list[float]  # fraction of the reference in each bin
    recent: list[float]  # fraction of the window in each bin


def drift(reference: InputReference, window: Iterable[InputFeatures]) -> dict[str, FeatureDrift]:
    """Each reference feature's PSI, over the reference's bins and any new category the window holds."""
    window = list(window)
    readings = {}
    for name, feature in reference.features.items():
        seen = [feature.bin_of(f[name]) for f in window if name in f]
        if not seen:
            continue
        bins = list(feature.bins) + sorted(set(seen) - set(feature.bins))
        reference_counts = list(feature.counts) + [0] * (len(bins) - len(feature.bins))
        recent_counts = [seen.count(b) for b in bins]
        readings[name] = FeatureDrift(
            psi=population_stability_index(reference_counts, recent_counts),
            bins=bins,
            reference=[c / max(sum(reference_counts), 1) for c in reference_counts],
            recent=[c / len(seen) for c in recent_counts],
        )
    return readings


class InputMonitor:
    """One process's view of the inputs it read: counts them, keeps each model version's last ``window`` and exports
    their drift from the version's reference (``medserve_input_drift_psi`` and the bins' fractions).

    ``observe`` is cheap (a few features over at most ``window`` inputs) and thread-safe; it never raises: input
    monitoring must not fail a request.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, export: bool = True):
        self.window = window
        self.export = export
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], deque[InputFeatures]] = {}
        # (model, version, folder) -> (the file's modification time, its reference)
        self._references: dict[tuple[str, str, str], tuple[int | None, InputReference | None]] = {}

    def observe(self, model: str, version: str, folder: Path, features: InputFeatures) -> dict[str, FeatureDrift]:
        """Record one input of ``model`` ``version`` (whose files are in ``folder``); its drift readings, or {} when
        the version has no reference (or it cannot be read)."""
        try:
            return self._observe(model, version, Path(folder), features)
        except Exception as e:  # a broken reference file, say: logged, and the request goes on
            logger.warning("input monitoring of %s %s failed: %s", model, version, type(e).__name__)
            return {}

    def observe_study(self, model: str, version: str, folder: Path, volume: Volume) -> dict[str, FeatureDrift]:
        """``observe`` with a study's features (``study_features``), computed here; never raises."""
        try:
            features = study_features(volume)
        except Exception as e:
            logger.warning("input monitoring of %s %s failed: %s", model, version, type(e).__name__)
            return {}
        return self.observe(model, version, folder, features)

    def _observe(self, model: str, version: str, folder: Path, features: InputFeatures) -> dict[str, FeatureDrift]:
        with self._lock:
            window = self._windows.setdefault((model, version), deque(maxlen=self.window))
            window.append(features)
            reference = self._reference(model, version, folder)
            readings = drift(reference, window) if reference is not None else {}
            inputs = len(window)
        if self.export:
            categories = {name: str(value) for name, value in features.items() if name in CATEGORY_FEATURES}
            record_input_drift(model, version, categories, readings, inputs)
        return readings

    def _reference(self, model: str, version: str, folder: Path) -> InputReference | None:
        # Keyed by the file's modification time too: a reference written while the server runs is read at once.
        path = folder / REFERENCE_FILE
        modified = path.stat().st_mtime_ns if path.is_file() else None
        key = (model, version, str(folder))
        if key not in self._references or self._references[key][0] != modified:
            self._references[key] = (modified, InputReference.load(folder))
        return self._references[key][1]


@functools.cache
def input_monitor(window: int = DEFAULT_WINDOW) -> InputMonitor:
    """This process's monitor (one per window size: one per process in practice)."""
    return InputMonitor(window)
