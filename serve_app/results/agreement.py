"""How far two results of the same study agree: a shadowed candidate's against the live version's.

Dice per foreground label on the study's whole grid (two empty masks of a label agree: 1.0), and the difference of
each label's volume in mL (candidate minus live), from the volumes each result measured.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from serve_app.results.store import ResultStore

__all__ = ["Agreement", "agreement_of"]


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


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    both = int(a.sum()) + int(b.sum())
    if both == 0:
        return 1.0
    return round(2.0 * int(np.logical_and(a, b).sum()) / both, 6)
