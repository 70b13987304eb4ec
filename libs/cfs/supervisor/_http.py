"""Tiny HTTP GET for readiness probes of local servers (stdlib only, never via a proxy)."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request

# Probes target 127.0.0.1; an http_proxy in the environment must not intercept them.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """Return (status, body); status is 0 when nothing answered (refused, reset, timeout)."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            status: int = resp.status
            return status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, http.client.HTTPException):
        # URLError and TimeoutError are OSErrors.
        return 0, b""
