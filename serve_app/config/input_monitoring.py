"""The ``input_monitoring`` section: how many of a model version's last inputs its drift score is computed over."""

from __future__ import annotations

from pydantic import Field

from serve_app.strict_model import StrictModel

__all__ = ["InputMonitoringConfig"]


class InputMonitoringConfig(StrictModel):
    """Input monitoring (docs/monitoring.md): features of every study and slide, and their drift from the model's
    reference distribution."""

    window_inputs: int = Field(
        200,
        ge=10,
        le=100_000,
        description="The last inputs of a model version (per process that reads them: a preprocessing replica, a "
        "WSI job driver) whose distribution is compared with the model's reference (population stability index).",
    )
