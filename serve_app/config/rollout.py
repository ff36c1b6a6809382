"""The ``rollouts`` section: a model's candidate version put in front of its traffic, in shadow or as a canary.

    rollouts:
      organ:                     # the model's name
        candidate: "1.1.0"       # the version being tried
        mode: shadow             # shadow: live answers, the candidate runs beside it; canary: a weighted split
        fraction: 1.0            # shadow: the fraction of studies the candidate also runs on
        abort: {min_mean_dice: 0.9, agreement_window: 50}

What each mode does, what is measured and when a rollout aborts itself: docs/rollouts.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from serve_app.strict_model import StrictModel

__all__ = ["RolloutAbortConfig", "RolloutConfig", "RolloutMode"]

RolloutMode = Literal["shadow", "canary"]


def _fraction(field: str, value: float, low_open: bool = False) -> float:
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        bounds = "0 < x <= 1" if low_open else "0 <= x <= 1"
        raise ValueError(f"{field} is {value!r}: it must be a fraction, {bounds}")
    return value


class RolloutAbortConfig(StrictModel):
    """When a running rollout aborts itself (all traffic back to the live version, audited, its reason kept)."""

    min_mean_dice: float = Field(
        0.9,
        description="Shadow: abort when the mean Dice between the candidate's mask and the live version's, over the "
        "last agreement_window shadowed studies, falls below this (0..1).",
    )
    agreement_window: int = Field(
        50, ge=1, le=10_000, description="Shadow: how many of the latest shadowed studies the mean Dice is taken over."
    )
    min_studies: int = Field(
        10,
        ge=1,
        le=10_000,
        description="Shadowed studies (agreement) or candidate runs (errors) the window must hold before a "
        "threshold is judged: one bad study early on does not abort a rollout.",
    )
    max_error_ratio: float = Field(
        0.1,
        description="Abort when more than this fraction of the candidate's runs over the last error_window failed "
        "with a server error (shadow runs and canary requests alike; 0..1).",
    )
    error_window: int = Field(
        50, ge=1, le=10_000, description="How many of the candidate's latest runs the error ratio is taken over."
    )

    @field_validator("min_mean_dice")
    @classmethod
    def _dice_is_a_fraction(cls, value: float) -> float:
        return _fraction("min_mean_dice", value)

    @field_validator("max_error_ratio")
    @classmethod
    def _errors_are_a_fraction(cls, value: float) -> float:
        return _fraction("max_error_ratio", value)


class RolloutConfig(StrictModel):
    """One model's rollout: which version is tried, how, and when it aborts itself. Promoted or aborted with
    `medserve rollout promote|abort MODEL`; changing this section starts a new rollout."""

    candidate: str = Field(description="The version being tried: a version of the model in the repository.")
    live: str | None = Field(
        None,
        description="The version that answers meanwhile; null: the newest version other than the candidate.",
    )
    mode: RolloutMode = Field(
        description="shadow: the live version answers every study and the candidate also runs on a fraction of "
        "them, its results kept for review and compared with the live ones; canary: a weighted share of studies "
        "is answered by the candidate, the same study always by the same version."
    )
    fraction: float = Field(
        1.0,
        description="Shadow: the fraction of studies the candidate also runs on (0 < fraction <= 1), the same "
        "study always in or always out.",
    )
    weight: float = Field(
        10.0,
        description="Canary: the percentage of studies the candidate answers (0..100), chosen by a hash of the "
        "study's identity.",
    )
    max_shadow_in_flight: int = Field(
        2,
        ge=1,
        le=64,
        description="Shadow: candidate runs one ingress replica keeps going at once; a study that finds them all "
        "busy is not shadowed (counted as dropped), so the candidate never queues ahead of live work.",
    )
    abort: RolloutAbortConfig = Field(
        RolloutAbortConfig(), description="When the rollout aborts itself; the defaults are stated in each field."
    )

    @field_validator("fraction")
    @classmethod
    def _fraction_of_studies(cls, value: float) -> float:
        return _fraction("fraction", value, low_open=True)

    @field_validator("weight")
    @classmethod
    def _weight_is_a_percentage(cls, value: float) -> float:
        if not 0 <= value <= 100:
            raise ValueError(f"weight is {value!r}: it must be a percentage, 0 <= weight <= 100")
        return value

    @model_validator(mode="after")
    def _two_versions(self) -> RolloutConfig:
        if self.live is not None and self.live == self.candidate:
            raise ValueError(
                f"live and candidate are both {self.candidate!r}: a rollout tries one version against another"
            )
        return self
