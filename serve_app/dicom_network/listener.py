"""The DICOM listener: a pynetdicom SCP answering C-ECHO and C-STORE on the configured AE titles.

Association control: an association names a called AE title of ``dicom_network.ae_titles`` and a calling AE
title (and address) that title allows, or it is rejected (PS3.8 A-ASSOCIATE-RJ: called or calling AE title not
recognised) and audited: AE titles and the peer's address only, nothing of a patient. More than
``limits.max_associations`` at once are rejected as transient (local limit exceeded), and so is an association to
a tenant whose inbox is full (``has_room``): a sender that keeps opening associations costs a refusal each.

A C-STORE of a SOP class medserve stores (``STORED_SOP_CLASSES``: what the segmentation path reads) is handed, as
the file the sender's bytes were received into (the data set as it encoded it), to ``receive``, which stores it
durably before the listener answers Success; another SOP class is answered 0122 (SOP class not supported), a data
set that is not DICOM C000 (cannot understand), one without its UIDs A900 (data set does not match SOP class), one
over ``limits.max_instance_bytes`` A700 (out of resources), and whatever ``receive`` refuses with its status. While
the tenant's inbox is full a C-STORE is answered A700 before its data set is read: a flood of instances past the
limit costs neither a parse nor a write, and the listener's other associations are not slowed by it.

pynetdicom receives each data set into a temporary file (``STORE_RECV_CHUNKED_DATASET``, 0600, deleted once
answered), not into memory: many associations sending large instances at once hold no more than a PDU each.

Every accepted connection gets TCP_NODELAY: a C-STORE answer is a small segment that Nagle's algorithm would hold
back until the sender's delayed ACK (about 40 ms an instance); and its threads wait for work rather than poll for it
(``reactor_wakeups``).
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import uid
from pydicom.pixels import get_decoder
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

import serve_app.studies.transfer_syntaxes  # noqa: F401  (registers the JPEG decoder plugin the reader uses)
from serve_app.config.dicom_network import DicomNetworkConfig
from serve_app.dicom_network.reactor_wakeups import wake_on_work
from serve_app.errors import DimseStatus, InstanceRefused
from serve_app.observability import metrics
from serve_app.tenancy.audit import AuditLog

__all__ = ["ANONYMOUS_TENANT", "STORED_SOP_CLASSES", "Arrival", "DicomListener"]

ANONYMOUS_TENANT = "anonymous"  # the tenant of an open server (no tenants configured)
# pynetdicom's INFO lines name the instances received (UIDs) and peers: kept out of the logs.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
LOGGER = logging.getLogger(__name__)

# The SOP classes the segmentation path reads: CT and MR, single-frame and (enhanced, legacy converted) multi-frame.
STORED_SOP_CLASSES = frozenset(
    {
        uid.CTImageStorage,
        uid.EnhancedCTImageStorage,
        uid.LegacyConvertedEnhancedCTImageStorage,
        uid.MRImageStorage,
        uid.EnhancedMRImageStorage,
        uid.LegacyConvertedEnhancedMRImageStorage,
    }
)
_UNCOMPRESSED = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian]
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_FILING_TAGS = [*_REQUIRED_UIDS, "SOPClassUID"]
# The largest PDU a sender may send: pynetdicom's default (16 kB) cuts a 512x512 slice into 32 PDUs, each a pass
# through its reactor (a fifth more time per instance); 1 MiB takes one in one, and bounds what one read holds.
_MAX_PDU_BYTES = 1 << 20
_INBOX_FULL = "tenant's inbox is full"  # the refusal's reason, as the node's receive says it too
# A-ASSOCIATE-RJ (result, source, reason): permanent, by the service user.
_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
_CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
# A-ASSOCIATE-RJ: transient, by the service provider (presentation related): local limit exceeded.
_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


def _decodable_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data medserve's reader decodes here: uncompressed, and each compressed
    syntax one of the installed pydicom plugins decodes."""
    compressed = []
    for syntax in uid.AllTransferSyntaxes:
        if syntax in _UNCOMPRESSED or not uid.UID(syntax).is_compressed:
            continue
        try:
            if get_decoder(syntax).is_available:
                compressed.append(syntax)
        except NotImplementedError:
            continue
    return [*_UNCOMPRESSED, *compressed]


@dataclass(frozen=True)
class Arrival:
    """One instance a C-STORE brought, accepted by association control and parsed enough to be filed.

    Args:
        tenant: the tenant of the called AE title.
        called_ae_title, calling_ae_title: the association's.
        header: the elements of its data set that file it: StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID
            (present) and SOPClassUID.
        received: the Part-10 file, the data set as the sender encoded it (the listener's receiving file: valid
            until the C-STORE is answered).
        size: its bytes.
    """

    tenant: str
    called_ae_title: str
    calling_ae_title: str
    header: pydicom.Dataset
    received: Path
    size: int


@dataclass
class _Session:
    """One accepted association: who sent, and what came of its C-STOREs (audited when it closes)."""

    tenant: str
    called_ae_title: str
    calling_ae_title: str
    peer: str
    outcomes: Counter = field(default_factory=Counter)


class DicomListener:
    """The SCP of ``config``: ``start`` binds and serves in background threads, ``stop`` closes.

    Args:
        config: the ``dicom_network`` section.
        receive: stores an ``Arrival`` durably, or raises ``InstanceRefused``; True if it was new, False if it was
            on disk already (a re-send).
        audit: where rejected associations and each association's outcome are recorded.
        has_room: whether a tenant's inbox takes more instances now; while it does not, its C-STOREs are answered
            A700 unread and its new associations are rejected (transient).
    """

    def __init__(
        self,
        config: DicomNetworkConfig,
        receive: Callable[[Arrival], bool],
        audit: AuditLog,
        has_room: Callable[[str], bool] = lambda tenant: True,
    ):
        self.config, self._receive, self._audit, self._has_room = config, receive, audit, has_room
        # Process-wide in pynetdicom: a replica's only SCP is this listener, and an SCU never receives a data set.
        _config.STORE_RECV_CHUNKED_DATASET = True
        self._sessions: dict[int, _Session] = {}
        self._lock = threading.Lock()
        self._server = None
        self._ae = AE()
        self._ae.maximum_associations = config.limits.max_associations
        self._ae.maximum_pdu_size = _MAX_PDU_BYTES
        self._ae.require_called_aet = False  # checked per title in _on_requested
        self._ae.network_timeout = self._ae.dimse_timeout = self._ae.acse_timeout = config.network_timeout_s
        self._ae.add_supported_context(Verification)
        decodable = _decodable_syntaxes()
        for context in AllStoragePresentationContexts:
            stored = context.abstract_syntax in STORED_SOP_CLASSES
            # A class not stored is still negotiated, so that its C-STORE gets its status (0122), not a refusal of
            # the whole association that would stop a PACS sending the rest of a study.
            self._ae.add_supported_context(context.abstract_syntax, decodable if stored else _UNCOMPRESSED)

    @property
    def port(self) -> int:
        """The port it listens on (the one the system chose when ``config.port`` is 0)."""
        return self._server.server_address[1]

    @property
    def listening(self) -> bool:
        """Whether its server is started and its socket open."""
        return self._server is not None and self._server.socket.fileno() >= 0

    def start(self) -> int:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, lambda event: DimseStatus.SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        address = (self.config.host, self.config.port)
        self._server = self._ae.start_server(address, block=False, evt_handlers=handlers)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_connection(self, event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wake_on_work(event.assoc)

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        called, calling = request.called_ae_title.strip(), request.calling_ae_title.strip()
        peer = assoc.requestor.address
        title = self.config.ae_titles.get(called)
        rejection, tenant = None, None
        if title is None:
            rejection, reason = _CALLED_AE_NOT_RECOGNISED, "called AE title not recognised"
        elif not title.allows(calling, peer):
            rejection, reason = _CALLING_AE_NOT_RECOGNISED, "calling AE title not allowed from this address"
        elif not self._has_room(tenant := title.tenant or ANONYMOUS_TENANT):
            rejection, reason = _LOCAL_LIMIT_EXCEEDED, _INBOX_FULL
        if rejection is not None:
            self._audit.write(
                {
                    "request_id": uuid.uuid4().hex,
                    "route": "dicom-association",
                    "outcome": "rejected",
                    "reason": reason,
                    **({"tenant": tenant} if tenant is not None else {}),
                    "called_ae_title": called,
                    "calling_ae_title": calling,
                    "peer": peer,
                }
            )
            assoc.acse.send_reject(*rejection)
            assoc.kill()
            return
        assoc.acceptor.ae_title = called
        with self._lock:
            self._sessions[id(assoc)] = _Session(tenant, called, calling, peer)

    def _on_store(self, event) -> int:
        session = self._sessions[id(event.assoc)]
        try:
            if event.request.AffectedSOPClassUID not in STORED_SOP_CLASSES:
                raise InstanceRefused("SOP class not stored", DimseStatus.SOP_CLASS_NOT_SUPPORTED)
            if not self._has_room(session.tenant):
                raise InstanceRefused(_INBOX_FULL, DimseStatus.OUT_OF_RESOURCES)
            arrival = self._arrival(event, session)
            outcome = "stored" if self._receive(arrival) else "duplicate"
            status = DimseStatus.SUCCESS
        except InstanceRefused as refusal:
            outcome, status = refusal.reason, refusal.status
        except Exception:  # a fault of medserve's own, not the sender's: it may send again
            LOGGER.exception("storing a received instance failed")
            outcome, status = "processing failure", DimseStatus.PROCESSING_FAILURE
        session.outcomes[outcome] += 1
        metrics.count_dicom_instance(session.tenant, outcome if status == DimseStatus.SUCCESS else "refused")
        return status

    def _arrival(self, event, session: _Session) -> Arrival:
        sop_class = event.request.AffectedSOPClassUID
        received = event.dataset_path
        size = received.stat().st_size
        if size > self.config.limits.max_instance_bytes:
            raise InstanceRefused("instance larger than the node's limit", DimseStatus.OUT_OF_RESOURCES)
        try:
            # Only the elements filing needs: reading the whole header cost a third of a C-STORE's own time.
            header = pydicom.dcmread(received, stop_before_pixels=True, specific_tags=_FILING_TAGS)
            uids = [str(header.get(keyword) or "").strip() for keyword in _REQUIRED_UIDS]
            header_sop_class = header.get("SOPClassUID")
        except Exception:  # pydicom raises anything on a stream that is not DICOM
            raise InstanceRefused("data set is not DICOM", DimseStatus.CANNOT_UNDERSTAND) from None
        if not all(uids) or any(len(value) > 64 for value in uids):
            raise InstanceRefused(
                "data set lacks a study, series or instance UID", DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
            )
        if header_sop_class != sop_class:
            raise InstanceRefused(
                "data set is not of the SOP class sent", DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
            )
        return Arrival(session.tenant, session.called_ae_title, session.calling_ae_title, header, received, size)

    def _on_closed(self, event) -> None:
        with self._lock:
            session = self._sessions.pop(id(event.assoc), None)
        if session is not None:
            self._audit.write(
                {
                    "request_id": uuid.uuid4().hex,
                    "route": "dicom-association",
                    "outcome": "closed",
                    "tenant": session.tenant,
                    "called_ae_title": session.called_ae_title,
                    "calling_ae_title": session.calling_ae_title,
                    "peer": session.peer,
                    "instances": dict(session.outcomes),
                }  # fmt: skip
            )
