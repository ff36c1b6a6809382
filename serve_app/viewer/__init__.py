"""The browser viewer: one static page at ``/viewer/`` that talks to the API with the tenant's key.

static/index.html, viewer.js, viewer.css  the page: pick a model, upload a study or open a result by id, watch
                                          progress, see the image and mask in three views, review the result
static/niivue/                            @niivue/niivue's browser bundle and its LICENSE, vendored from npm
                                          (``make niivue``): the page works offline, with no CDN

The files are package data, served by the ingress with Starlette's ``StaticFiles`` (which refuses paths outside
its folder). They need no key: the page asks for one and sends it with every API call.
"""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles

__all__ = ["VIEWER_FILES", "VIEWER_PATH", "viewer_files"]

VIEWER_PATH = "/viewer"
VIEWER_FILES = Path(__file__).with_name("static")


def viewer_files() -> StaticFiles:
    """The page's files, for ``api.mount(VIEWER_PATH, ...)``; ``/viewer/`` answers index.html."""
    return StaticFiles(directory=VIEWER_FILES, html=True)
