"""medserve as a DICOM node: series received by C-STORE, routed to models by their tags, results delivered back.

The listener's path, file by file:

config.py     the ``dicom_network``, ``routes`` and ``destinations`` config sections, checked against the rest
listener.py   ``DicomListener``: the pynetdicom SCP (C-ECHO, C-STORE), association control, TCP_NODELAY
inbox.py      ``Inbox``: each instance durable (bytes and name) before Success, a folder per series, re-sends idempotent
series.py     ``SeriesBook``: series complete after ``stable_after_s``; their state, kept across restarts
routing.py    ``match_routes``: which routes (models) take a complete series
node.py       ``DicomNode``: all of it together, calling a ``SeriesProcessor`` per routed series
outbox.py     ``Outbox``: results waiting for their destinations, retried with backoff, never sent twice
delivery.py   ``Destinations``: C-STORE to a PACS's AE, or STOW-RS to a server of the ``pacs`` section
pipeline.py   ``SegmentationProcessor``: a routed series through the application's segmentation stages
deliveries.py ``DeliveriesService``: the outbox as the HTTP API sees it (``/v1/deliveries``)
stow_routing.py  ``StowRouting``: a STOW-RS push naming no model, routed by the same rules

Its errors (refused C-STOREs and their DIMSE statuses, failed deliveries) are in ``serve_app.errors``; the node's
Serve deployment is ``deployments/dicom_node.py``.
"""
