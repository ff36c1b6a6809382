"""The CLI's errors, and the one place where httpx's errors and answers become a line a user can act on.

``main`` prints ``CommandError`` and ``describe_http_error(e)`` after ``medserve: ``; commands check answers with
``json_answer`` (or ``reason_of`` for answers that are not JSON)::

    model_list = json_answer(client.get("/v1/models"))  # CommandError("502: Bad Gateway"), say, when it is not 200
"""

from __future__ import annotations

import ssl

import httpx

__all__ = ["CommandError", "describe_http_error", "json_answer", "reason_of"]


class CommandError(Exception):
    """A command failed in a way the user can fix: ``medserve`` prints it on one line and exits 2."""


def describe_http_error(error: httpx.HTTPError | httpx.InvalidURL) -> str:
    """One line for an httpx error: what failed and what to do, without a traceback."""
    if isinstance(error, httpx.InvalidURL | httpx.UnsupportedProtocol):  # the server URL is the only one users give
        return f"bad server URL (--url or $MEDSERVE_URL): {error}"
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
    """``status: reason`` of an error answer, in medserve's format or any other (a proxy's HTML page, say).

    One line: another server's page is shown with its whitespace collapsed, cut to 200 characters.
    """
    try:
        reason = response.json()["error"]["reason"]
    except (ValueError, KeyError, TypeError):
        reason = " ".join(response.text.split())[:200] or response.reason_phrase
    return f"{response.status_code}: {reason}"


def json_answer(response: httpx.Response) -> dict:
    """The JSON of a 200 answer; ``CommandError`` for any other status, or a 200 that is not JSON."""
    if response.status_code != 200:
        raise CommandError(reason_of(response))
    try:
        return response.json()
    except ValueError:
        raise CommandError(f"{response.url} answered 200 but not with JSON: is --url a medserve server?") from None
