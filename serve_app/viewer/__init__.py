"""The browser pages: the viewer, one static page at ``/viewer/`` that talks to the API with the tenant's key; and
the API's documentation at ``/docs`` (Swagger UI).

static/index.html, viewer.js, viewer.css  the page: pick a model, upload a study or open a result by id, watch
                                          progress, see the image and mask in three views, review the result
static/niivue/                            @niivue/niivue's browser bundle and its LICENSE, vendored from npm
                                          (``make niivue``): the page works offline, with no CDN
api_docs/index.html, docs.js              /docs: Swagger UI on the application's /openapi.json
api_docs/swagger-ui/                      swagger-ui-dist's bundle, stylesheet, favicon and licences, vendored from
                                          npm (``make swagger-ui``): no CDN, no script from another origin on the
                                          origin whose sessionStorage holds the viewer's API key

The files are package data, served by the ingress with Starlette's ``StaticFiles`` (which refuses paths outside
its folder). They need no key: the pages ask for one and send it with every API call.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

__all__ = ["DOCS_ASSETS_PATH", "DOCS_PATH", "VIEWER_FILES", "VIEWER_PATH", "docs_assets", "docs_page", "viewer_files"]

VIEWER_PATH = "/viewer"
VIEWER_FILES = Path(__file__).with_name("static")
DOCS_PATH = "/docs"
DOCS_ASSETS_PATH = "/docs/assets"
_DOCS_FILES = Path(__file__).with_name("api_docs")


def viewer_files() -> StaticFiles:
    """The page's files, for ``api.mount(VIEWER_PATH, ...)``; ``/viewer/`` answers index.html."""
    return StaticFiles(directory=VIEWER_FILES, html=True)


def docs_page() -> FileResponse:
    """The /docs page; its links are relative to ``DOCS_PATH``."""
    return FileResponse(_DOCS_FILES / "index.html", media_type="text/html")


def docs_assets() -> StaticFiles:
    """The /docs page's script, Swagger UI and its stylesheet, for ``api.mount(DOCS_ASSETS_PATH, ...)``."""
    return StaticFiles(directory=_DOCS_FILES)
