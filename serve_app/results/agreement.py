"""How far two results of the same study agree: a shadowed candidate's against the live version's.

Dice per foreground label on the study's whole grid (two empty masks of a label agree: 1.0), and the difference of
each label's volume in mL (candidate minus live), from the volumes each result measured.

A WSI slide's agreement (``heatmap_agreement``) is that of two tumour-probability heatmaps on the live grid: the mean
absolute difference of the probabilities over the tiles either classified (a tile the other left without one, no
tissue or a broken network's NaN, counted as probability 0: not tumour, as in the masks), the Dice of the tumour
masks (tiles at or above the threshold; the value a rollout's abort threshold compares, as a study's mean Dice) and
the difference of the tumour areas in mm², absolute and relative to the live area.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from serve_app.results.store import ResultStore

__all__ = ["Agreement", "HeatmapAgreement", "agreement_of", "heatmap_agreement"]


class Agreement(BaseModel):
    """One study's agreement between a candidate's result and the live one's."""

    dice: dict[str, float] = Field(description="Dice of each foreground label's masks, by label name.")
    volume_difference_ml: dict[str, float] = Field(
        description="Each foreground label's volume, candidate minus live, in mL, by label name."
    )
    mean_dice: float = Field(description="The mean of the labels' Dice.")


def agreement_of(results: ResultStore, live_id: str, candidate_id: str, tenant_id: str) -> Agreement:
    """The agreement of the tenant's results ``candidate_id`` and ``live_id``, made from the same study."""
    live, candidate = results.whole_mask(live_id, tenant_id), results.whole_mask(candidate_id, tenant_id)
    live_volumes = {v["name"]: (v["label"], v["volume_ml"]) for v in results.summary(live_id, tenant_id)["labels"]}
    candidate_volumes = {v["name"]: v["volume_ml"] for v in results.summary(candidate_id, tenant_id)["labels"]}
    if live.shape != candidate.shape:  # the same study read twice: only a broken candidate gets here
        dice = dict.fromkeys(live_volumes, 0.0)
    else:
        dice = {name: _dice(live == label, candidate == label) for name, (label, _) in live_volumes.items()}
    volumes = {
        name: round(candidate_volumes.get(name, 0.0) - volume_ml, 3) for name, (_, volume_ml) in live_volumes.items()
    }
    mean = float(np.mean(list(dice.values()))) if dice else 1.0
    return Agreement(dice=dice, volume_difference_ml=volumes, mean_dice=round(mean, 6))


class HeatmapAgreement(BaseModel):
    """One slide's agreement between a candidate tile model's heatmap and the live one's."""

    dice: dict[str, float] = Field(description="Dice of the thresholded tumour masks, by the tumour label's name.")
    mean_dice: float = Field(
        description="The tumour masks' Dice (two empty masks agree: 1.0): what a rollout's min_mean_dice compares."
    )
    heatmap_mean_abs_difference: float = Field(
        description="The mean absolute difference of the tumour probabilities over the tiles either classified, a "
        "tile without a probability counted as 0 (0..1)."
    )
    tumour_area_difference_mm2: float = Field(description="The tumour area, candidate minus live, in mm².")
    tumour_area_relative_difference: float | None = Field(
        description="That difference over the live tumour area; null when the live version found no tumour."
    )


def heatmap_agreement(
    live: np.ndarray,
    candidate: np.ndarray,
    *,
    label: str,
    live_area_mm2: float,
    candidate_area_mm2: float,
    threshold: float = 0.5,
) -> HeatmapAgreement:
    """The agreement of two heatmaps of one slide: ``candidate`` already on ``live``'s grid (NaN: no tissue, not
    classified); a tile is tumour at ``threshold`` or above, and the areas are those each run measured."""
    either = np.isfinite(live) | np.isfinite(candidate)
    unclassified_as_0 = np.nan_to_num(live[either], nan=0.0), np.nan_to_num(candidate[either], nan=0.0)
    difference = float(np.abs(unclassified_as_0[0] - unclassified_as_0[1]).mean()) if either.any() else 0.0
    with np.errstate(invalid="ignore"):  # NaN compares False: not tumour
        dice = _dice(live >= threshold, candidate >= threshold)
    area = round(candidate_area_mm2 - live_area_mm2, 4)
    return HeatmapAgreement(
        dice={label: dice},
        mean_dice=dice,
        heatmap_mean_abs_difference=round(difference, 6),
        tumour_area_difference_mm2=area,
        tumour_area_relative_difference=round(area / live_area_mm2, 6) if live_area_mm2 > 0 else None,
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    both = int(a.sum()) + int(b.sum())
    if both == 0:
        return 1.0
    return round(2.0 * int(np.logical_and(a, b).sum()) / both, 6)
