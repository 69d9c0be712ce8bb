"""Downloads of disk images and ISOs given by URL (http and https only)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

CHUNK = 1024 * 1024
MAX_DOWNLOAD = 256 * 1024**3  # the largest image anyone should pull over HTTP


class FetchError(Exception):
    """A download failed; the message says what the server or network did."""


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def check_url(url: str) -> str:
    """The URL's last path segment, the default name of what it downloads."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"{url!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise FetchError("credentials in URLs are not accepted (they would be logged)")
    return unquote(parts.path.rsplit("/", 1)[-1])


async def download(
    url: str,
    dest: Path,
    *,
    max_bytes: int = MAX_DOWNLOAD,
    progress: Callable[[int], Awaitable[None]] | None = None,
    timeout: float = 30.0,
) -> int:
    """Stream `url` into `dest` (created 0600); returns the byte count.

    `progress` receives 0-100 when the server sends a length. On failure
    `dest` is removed and FetchError says why.
    """
    check_url(url)
    received = 0
    try:
        async with (
            httpx.AsyncClient(follow_redirects=True, timeout=timeout) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise FetchError(f"{url}: the server answered HTTP {response.status_code}")
            total = int(response.headers.get("content-length") or 0)
            if total > max_bytes:
                raise FetchError(f"{url} is {total} bytes, more than the limit of {max_bytes}")
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                last = -1
                async for chunk in response.aiter_bytes(CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        raise FetchError(f"{url} is larger than the limit of {max_bytes} bytes")
                    out.write(chunk)
                    if progress and total:
                        percent = min(100, received * 100 // total)
                        if percent != last:
                            last = percent
                            await progress(percent)
            if total and received != total:
                raise FetchError(f"{url}: the server sent {received} of {total} bytes")
    except httpx.HTTPError as exc:
        dest.unlink(missing_ok=True)
        raise FetchError(f"{url}: {exc.__class__.__name__}: {exc}") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return received
