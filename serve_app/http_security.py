"""What every HTTP answer of the ingress is guarded by, whatever the route: the Host header checked against the
allow-list, and the web headers a browser must see.

``HostAllowList`` answers a request whose Host is not one the application answers for (``http.allowed_hosts``,
``HttpConfig.host_allow_list``) with 400 before any route runs or any of its body is read: a page on another site
whose name was made to resolve to a loopback server (DNS rebinding) reaches it with its own name as the Host.
``SecurityHeaders`` adds the Content-Security-Policy and its companions to every answer, and ``Cache-Control:
no-store`` to every answer but the static files of the viewer and of /docs: results, masks, DICOM documents, images,
reviews, WSI outputs and job records carry patient data that no browser or proxy cache should keep.

Both are plain ASGI, not Starlette's ``BaseHTTPMiddleware`` (which relays each request's body through a stream of
its own: see ``serve_app.drain.DrainGate``).

Usage::

    api.add_middleware(HostAllowList, refusal=lambda error: JSONResponse({...}, status_code=error.status_code))
    api.add_middleware(SecurityHeaders, cacheable=("/viewer/", "/docs/assets/"))
    api.state.allowed_hosts = config.http.host_allow_list()  # in the replica, before it serves
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import HostNotAllowed, RequestError

__all__ = ["ANY_HOST", "CONTENT_SECURITY_POLICY", "SECURITY_HEADERS", "HostAllowList", "SecurityHeaders", "host_of"]

ANY_HOST = "*"
# The API's own routes that answer any Host: liveness and readiness carry no patient data, and an operator's load
# balancer or `medserve up` may probe them by an address (a pod's IP, 0.0.0.0) no allow-list names. Serve's and
# HAProxy's own checks (/-/healthz, /-/routes) are answered by the replica's server before the application.
_ANY_HOST_PATHS = ("/healthz", "/readyz")

# 'self' for everything; beyond it only what the pages need: images from data: URLs (Swagger UI's stylesheet draws
# its icons with them) and WebAssembly compiled by niivue (its image decoders). No inline script or style anywhere:
# both pages load their code from files. No page may frame an answer (clickjacking the viewer's review buttons).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; img-src 'self' data: blob:; "
    "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
# Every answer's, as a route or an error handler may also set them; Cache-Control: no-store on all but static files.
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_HEADERS = tuple((name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items())
_STATIC_HEADERS = tuple(header for header in _HEADERS if header[0] != b"cache-control")


def host_of(scope: Scope) -> str | None:
    """The request's Host header without its port, lower case (an IPv6 address without its brackets); None
    without one."""
    for name, value in scope["headers"]:
        if name == b"host":
            host = value.decode("latin-1").strip().lower()
            if host.startswith("["):  # [::1]:8000
                return host[1:].partition("]")[0]
            return host.rpartition(":")[0] if host.count(":") == 1 else host
    return None


def _route_path(scope: Scope) -> str:
    """The request's path within the application (without the route prefix Serve mounts it at)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class HostAllowList:
    """ASGI middleware: a request whose Host is not in ``app.state.allowed_hosts`` (set by the replica from the
    config; ``*`` in it allows any) is answered ``refusal(HostNotAllowed(...))`` and goes no further. Until the
    list is set nothing is allowed: a check that was never configured refuses rather than passes."""

    def __init__(self, app: ASGIApp, *, refusal: Callable[[RequestError], Response]):
        self.app, self.refusal = app, refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) in _ANY_HOST_PATHS:
            await self.app(scope, receive, send)
            return
        allowed = getattr(scope["app"].state, "allowed_hosts", ())
        if ANY_HOST in allowed or host_of(scope) in allowed:
            await self.app(scope, receive, send)
            return
        error = HostNotAllowed(
            "the request's Host header names a host this server does not answer for (http.allowed_hosts)"
        )
        await self.refusal(error)(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware: every answer gets ``CONTENT_SECURITY_POLICY``, ``X-Content-Type-Options: nosniff``,
    ``X-Frame-Options: DENY`` and ``Referrer-Policy: no-referrer`` (where a route did not set its own), and
    ``Cache-Control: no-store`` unless its path is under one of ``cacheable`` (within the application, e.g.
    ``/viewer/``): static files that carry no patient data."""

    def __init__(self, app: ASGIApp, *, cacheable: tuple[str, ...] = ()):
        self.app, self.cacheable = app, cacheable

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = _STATIC_HEADERS if _route_path(scope).startswith(self.cacheable) else _HEADERS

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers.extend(header for header in added if header[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
