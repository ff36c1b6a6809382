"""Wake an accepted association's two pynetdicom threads when there is work for them, not at their next poll.

pynetdicom (3.0) runs an association as two polling loops. Its DUL thread reads the socket and sends what the
association queued, sleeping 1 ms after a loop that found nothing; the association's thread looks for a complete
DIMSE message once a millisecond. A C-STORE so waits for up to a millisecond at each of three hand-overs (its
message to the handler, the handler's answer to the socket, the sender's next request from the socket): for a CT
series sent over one association, a fifth of the time medserve takes to receive it, and an idle association
costs its two threads a wake-up every millisecond.

``wake_on_work`` gives the association's loops queues whose non-blocking ``get``, the loops' poll, waits for the
work instead (at most ``IDLE_WAIT_S``, so that the loops' other checks, timers and shutdown still run): the DUL's
for its socket to become readable or a primitive to be queued, the association's for a DIMSE message. The loops
are pynetdicom's own; only what they poll changes.

Usage (an ``EVT_CONN_OPEN`` handler of the server: before the association's threads start)::

    def on_connection(event):
        wake_on_work(event.assoc)
"""

from __future__ import annotations

import queue
import select
import socket
import time
import weakref

from pynetdicom import evt
from pynetdicom.association import Association

__all__ = ["IDLE_WAIT_S", "wake_on_work"]

# The longest a loop waits for work before it runs its other checks (ARTIM and idle timers, release, abort, stop).
IDLE_WAIT_S = 0.005


class _Doorbell:
    """A socket pair: ``ring`` from any thread makes ``bell`` readable, so that a ``select`` on the peer's socket
    wakes for it too."""

    def __init__(self):
        self.bell, self._button = socket.socketpair()
        self.bell.setblocking(False)
        self._button.setblocking(False)

    def ring(self) -> None:
        try:
            self._button.send(b"\0")
        except (BlockingIOError, OSError):  # rung already (the buffer is full of rings), or closed
            pass

    def silence(self) -> None:
        try:
            while self.bell.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self.bell.close()
        self._button.close()


class _RingingQueue(queue.Queue):
    """A queue whose ``put`` rings ``doorbell``: something for the DUL thread to do."""

    def __init__(self, doorbell: _Doorbell):
        super().__init__()
        self._doorbell = doorbell

    def put(self, item, block=True, timeout=None) -> None:
        super().put(item, block, timeout)
        self._doorbell.ring()


class _DulEventQueue(_RingingQueue):
    """The DUL thread's event queue: polled empty, it waits until the peer's socket is readable or the doorbell
    rings (or ``IDLE_WAIT_S``), then answers as the poll would."""

    def __init__(self, doorbell: _Doorbell, dul):
        super().__init__(doorbell)
        self._dul = dul

    def get(self, block=True, timeout=None):
        if block or not self.empty():
            return super().get(block, timeout)
        peer = getattr(self._dul.socket, "socket", None)
        try:
            select.select([self._doorbell.bell] if peer is None else [peer, self._doorbell.bell], [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # a socket closed under us, the association ending: wait as a poll would
            time.sleep(IDLE_WAIT_S)
        self._doorbell.silence()
        return super().get(False)


class _DimseMessageQueue(queue.Queue):
    """The association thread's queue of DIMSE messages: polled empty, it waits for one (or ``IDLE_WAIT_S``)."""

    def get(self, block=True, timeout=None):
        return super().get(True, timeout if block else IDLE_WAIT_S)


def wake_on_work(assoc: Association) -> None:
    """Make ``assoc``'s DUL and association threads wait for work rather than poll for it. Call before its threads
    start (an ``EVT_CONN_OPEN`` handler of an acceptor); what its queues already hold is kept."""
    doorbell = _Doorbell()
    # Its sockets closed with the connection (a flood of connections must not hold two descriptors each until a
    # garbage collection), else with the association.
    assoc.bind(evt.EVT_CONN_CLOSE, lambda event: doorbell.close())
    weakref.finalize(assoc, doorbell.close)
    dul = assoc.dul
    for name, replacement in (
        ("event_queue", _DulEventQueue(doorbell, dul)),
        ("to_provider_queue", _RingingQueue(doorbell)),
    ):
        original = getattr(dul, name)
        while not original.empty():  # the connection's own event (Evt5), queued when its socket was set
            replacement.put(original.get())
        setattr(dul, name, replacement)
    dul._run_loop_delay = 0  # its sleep after an empty poll: the poll itself waits now
    assoc.dimse.msg_queue = _DimseMessageQueue()
