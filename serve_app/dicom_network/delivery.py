"""Delivery of result instances to a destination: C-STORE to a PACS's AE (pynetdicom), or STOW-RS to a DICOMweb
server of the ``pacs`` section (``PacsClient``).

Each call sends one result's files whole or raises ``DeliveryFailed``: transient when the destination was down,
busy or cut the association (the outbox tries again later), permanent when it refused the instances. What
pynetdicom, the PACS client and the file system raise is translated here, in ``_translated``, and nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context

from serve_app.config.dicom_network import DestinationConfig, DimseDestinationConfig
from serve_app.config.pacs import PacsConfig
from serve_app.dicomweb.pacs_client import PacsClient
from serve_app.errors import DeliveryFailed, PacsFailed

__all__ = ["Destinations"]

# pynetdicom's INFO lines name the instances it sends (UIDs): kept out of the logs.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

# C-STORE answers that mean "stored": Success, and the Warnings (coercion, elements discarded, no validation).
_STORED = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}
# Out of resources: the PACS may take it once it has room.
_TRANSIENT_STATUS_PREFIX = 0xA7


class Destinations:
    """The configured destinations, each delivered to by name.

    Args:
        destinations: the ``destinations`` config section.
        pacs: the ``pacs`` config section, which dicomweb destinations name.
    """

    def __init__(self, destinations: Mapping[str, DestinationConfig], pacs: Mapping[str, PacsConfig]):
        self._destinations = dict(destinations)
        self._pacs = dict(pacs)

    def deliver(self, name: str, files: Sequence[Path]) -> None:
        """Send ``files`` (DICOM Part-10) to destination ``name``; ``DeliveryFailed`` if it did not take them all."""
        destination = self._destinations.get(name)
        if destination is None:
            raise DeliveryFailed(f"destination {name!r} is no longer configured", transient=False)
        with _translated(name):
            if destination.dimse is not None:
                _c_store(destination.dimse, files)
            else:
                server = destination.dicomweb
                PacsClient(server, self._pacs[server]).store([pydicom.dcmread(path) for path in files])


def _c_store(destination: DimseDestinationConfig, files: Sequence[Path]) -> None:
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    ae = AE(ae_title=destination.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_s
    contexts = {}
    for header in headers:
        sop_class, syntax = header.file_meta.MediaStorageSOPClassUID, header.file_meta.TransferSyntaxUID
        contexts.setdefault(sop_class, {syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian}).add(syntax)
    ae.requested_contexts = [build_context(sop_class, sorted(syntaxes)) for sop_class, syntaxes in contexts.items()]
    association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not association.is_established:
        refused = "rejected the association" if association.is_rejected else "could not be reached"
        raise DeliveryFailed(
            f"{destination.ae_title} at {destination.host}:{destination.port} {refused}",
            transient=not association.is_rejected or _rejected_transiently(association),
        )
    try:
        for path in files:
            status = association.send_c_store(path)
            if "Status" not in status:
                raise DeliveryFailed(f"{destination.ae_title} did not answer a C-STORE in time", transient=True)
            if status.Status not in _STORED:
                raise DeliveryFailed(
                    f"{destination.ae_title} answered a C-STORE with status 0x{status.Status:04X}",
                    transient=status.Status >> 8 == _TRANSIENT_STATUS_PREFIX,
                )
    finally:
        if association.is_established:
            association.release()


def _rejected_transiently(association) -> bool:
    """Whether the peer rejected the association for now (busy), not for good (it does not know medserve's AE)."""
    rejection = association.acceptor.primitive
    return rejection is not None and rejection.result == 0x02


@contextmanager
def _translated(name: str) -> Iterator[None]:
    """The one place where what pynetdicom, the PACS client, pydicom and the file system raise becomes
    ``DeliveryFailed``."""
    try:
        yield
    except PacsFailed as e:
        raise DeliveryFailed(e.reason, transient=e.transient) from None
    except (InvalidDicomError, FileNotFoundError) as e:
        raise DeliveryFailed(f"a result file for {name} is missing or not DICOM ({type(e).__name__})", False) from None
    except (OSError, RuntimeError, ValueError) as e:  # sockets, and pynetdicom's own errors
        raise DeliveryFailed(f"sending to {name} failed: {type(e).__name__}", transient=True) from None
