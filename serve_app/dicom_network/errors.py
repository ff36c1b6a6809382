"""What goes wrong on the DICOM network, and the DIMSE statuses a refused C-STORE is answered with.

Messages name what was wrong, never what was sent: no patient data, no UIDs.
"""

from __future__ import annotations

__all__ = ["DeliveryFailed", "InstanceRefused", "Status"]


class Status:
    """C-STORE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C) medserve answers."""

    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


class InstanceRefused(Exception):
    """A C-STORE that medserve does not store: answered with ``status``, and the reason audited."""

    def __init__(self, reason: str, status: int):
        super().__init__(reason, status)
        self.reason, self.status = reason, status


class DeliveryFailed(Exception):
    """A destination that could not take a result. ``transient``: it may take it on a later try (down, busy);
    otherwise it refused it and another try would be refused the same."""

    def __init__(self, reason: str, transient: bool):
        super().__init__(reason, transient)
        self.reason, self.transient = reason, transient
