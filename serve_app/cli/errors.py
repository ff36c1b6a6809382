"""The CLI's errors, and the one place where httpx's errors become a line a user can act on."""

from __future__ import annotations

import ssl

import httpx

__all__ = ["CommandError", "describe_http_error", "reason_of"]


class CommandError(Exception):
    """A command failed in a way the user can fix: ``medserve`` prints it on one line and exits 2."""


def describe_http_error(error: httpx.HTTPError) -> str:
    """One line for an httpx error: what failed and what to do, without a traceback."""
    try:
        url = str(error.request.url.copy_with(path="/", query=None)).rstrip("/")
    except RuntimeError:  # an error raised before any request was made
        url = "the server"
    if isinstance(error, httpx.TimeoutException):
        timeout = (error.request.extensions.get("timeout") or {}).get("read")
        within = f" within {timeout:g} s" if timeout else ""
        return f"{url} did not answer{within} (--timeout sets how long to wait)"
    if isinstance(error, httpx.ConnectError):
        if isinstance(error.__context__, ssl.SSLError) or "SSL" in str(error) or "certificate" in str(error):
            return f"TLS with {url} failed: {error}"
        return f"cannot reach {url}: is the server running? (medserve up)"
    return f"talking to {url} failed: {type(error).__name__}: {error}"


def reason_of(response: httpx.Response) -> str:
    """``status: reason`` of an error answer, in medserve's format or any other (a proxy's HTML page, say)."""
    try:
        reason = response.json()["error"]["reason"]
    except (ValueError, KeyError, TypeError):
        reason = response.text.strip()[:200] or response.reason_phrase
    return f"{response.status_code}: {reason}"
