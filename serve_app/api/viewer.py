"""The browser pages' routes: the viewer at ``/viewer/`` and the API's documentation at ``/docs``, static and open
without a key (the pages ask for one and send it with every API call).

/docs is served from vendored Swagger UI files, not FastAPI's page, which loads them from a CDN and runs an inline
script the Content-Security-Policy refuses; no ReDoc.
"""

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse

from serve_app.viewer import DOCS_ASSETS_PATH, DOCS_PATH, VIEWER_PATH, docs_assets, docs_page, viewer_files

__all__ = ["STATIC_PREFIXES", "add_pages", "router"]

# The paths of static files, which a browser may cache (every other answer is no-store).
STATIC_PREFIXES = (f"{VIEWER_PATH}/", f"{DOCS_ASSETS_PATH}/")

router = APIRouter()


@router.get(DOCS_PATH, include_in_schema=False)
async def docs() -> FileResponse:
    """Swagger UI on /openapi.json, from the vendored files under /docs/assets."""
    return docs_page()


def add_pages(api: FastAPI) -> None:
    """The pages' files mounted on ``api``, and the /docs route (a router's ``include_router`` takes no mount)."""
    api.mount(VIEWER_PATH, viewer_files(), name="viewer")
    api.mount(DOCS_ASSETS_PATH, docs_assets(), name="docs-assets")
    api.include_router(router)
