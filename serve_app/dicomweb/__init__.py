"""DICOMweb: medserve beside a hospital's PACS.

config.py        the ``pacs`` config section: the servers medserve may talk to, and who may use them
pacs_client.py   ``PacsClient``: a series retrieved by WADO-RS to an upload folder; results stored by STOW-RS
stow.py          medserve as a STOW-RS destination: the request spooled to files; the STOW answer
multipart.py     a multipart/related body of DICOM instances written to files as it streams (STOW in, WADO in)
messages.py      the JSON bodies of the PACS routes
"""
