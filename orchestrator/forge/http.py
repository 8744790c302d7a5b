"""The HTTP client every forge module uses: one session, the forge's auth header, typed
errors that say whether trying again can help, and pagination to the end.

Retrying is the caller's decision (the status reporter and catch-up retry with backoff);
this module only classifies: 5xx, network errors and rate limits carry `retry_after_s`
(from `Retry-After`, or the rate-limit reset header: GitHub `X-RateLimit-Reset`, GitLab
`RateLimit-Reset`, both epoch seconds), other 4xx carry None.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp

DEFAULT_RETRY_S = 5.0
MAX_PAGES = 1000  # a listing longer than this is cut (and catch-up says so)
RESPONSE_CAP = 32 * 1024 * 1024  # a forge's answer larger than this is an error, not a job
NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


class ForgeApiError(Exception):
    """A forge API call failed. `retry_after_s` is set when trying again can help (5xx,
    network errors, rate limits: from `Retry-After` or the rate-limit reset header);
    None means it will not (other 4xx)."""

    def __init__(self, message: str, *, status: int | None, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


def retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `Retry-After` (seconds or an HTTP date) or a reset header."""
    value = headers.get("Retry-After")
    if value:
        if value.strip().isdigit():
            return float(value)
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - (now or time.time()))
        except (TypeError, ValueError):
            pass
    for name in ("X-RateLimit-Reset", "RateLimit-Reset"):
        reset = headers.get(name)
        if reset and reset.strip().isdigit():
            return max(0.0, float(reset) - (now or time.time()))
    return None


def _rate_limited(status: int, headers: Mapping[str, str]) -> bool:
    remaining = headers.get("X-RateLimit-Remaining", headers.get("RateLimit-Remaining"))
    return status == 429 or (status == 403 and (remaining == "0" or "Retry-After" in headers))


class ApiClient:
    def __init__(self, base_url: str, auth_headers: Mapping[str, str], *, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = dict(auth_headers)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.calls = 0  # API calls made
        self.budget: int | None = None  # calls still allowed (catch-up's per-repository bound)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        missing_ok: bool = False,
    ) -> tuple[bytes | None, Mapping[str, str]]:
        """The body and headers of a 2xx answer; (None, headers) for 404 with
        `missing_ok`. Raises `ForgeApiError` otherwise."""
        url = path if path.startswith(("http://", "https://")) else f"{self.base_url}{path}"
        if self.budget is not None:
            if self.budget <= 0:
                raise ForgeApiError(
                    f"{method} {path}: this pass's API call budget is spent", status=None, retry_after_s=None
                )
            self.budget -= 1
        self.calls += 1
        try:
            async with self._http().request(method, url, params=params, json=json_body, headers=headers) as response:
                body = await _read_capped(response)
                if len(body) > RESPONSE_CAP:
                    raise ForgeApiError(
                        f"{method} {path}: answer larger than {RESPONSE_CAP} bytes",
                        status=response.status,
                        retry_after_s=None,
                    )
                if response.status == 404 and missing_ok:
                    return None, response.headers
                if response.status >= 400:
                    raise _error(method, path, response.status, response.headers, body)
                return body, response.headers
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ForgeApiError(
                f"{method} {path}: {exc or type(exc).__name__}", status=None, retry_after_s=DEFAULT_RETRY_S
            ) from None

    async def get_json(self, path: str, *, params: Mapping[str, str] | None = None) -> Any:
        body, _ = await self.request("GET", path, params=params)
        return _json(body, path)

    async def get_all(self, path: str, *, params: Mapping[str, str] | None = None) -> list[Any]:
        """Every item of a paginated listing: follows `Link: <...>; rel="next"` (GitHub,
        Forgejo, GitLab) or GitLab's `X-Next-Page` to the end."""
        items: list[Any] = []
        url, query = path, dict(params or {})
        for _ in range(MAX_PAGES):
            body, headers = await self.request("GET", url, params=query)
            page = _json(body, path)
            if not isinstance(page, list):
                raise ForgeApiError(
                    f"GET {path}: expected a list, got {type(page).__name__}", status=200, retry_after_s=None
                )
            items.extend(page)
            link = NEXT_LINK.search(headers.get("Link", ""))
            if link:
                # Only the next page's query is taken: the link's host may be another one
                # than `base_url` (Forgejo builds it from its ROOT_URL), and the token
                # must not follow it there.
                query = dict(parse_qsl(urlsplit(link.group(1)).query))
            elif headers.get("X-Next-Page", "").strip().isdigit():
                query = {**query, "page": headers["X-Next-Page"].strip()}
            else:
                return items
        raise ForgeApiError(f"GET {path}: more than {MAX_PAGES} pages", status=200, retry_after_s=None)


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    """The whole body, or its first `RESPONSE_CAP + 1` bytes (`content.read(n)` would
    return only what has arrived so far)."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(256 * 1024):
        body += chunk
        if len(body) > RESPONSE_CAP:
            break
    return bytes(body)


def _json(body: bytes | None, path: str) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError:
        raise ForgeApiError(f"GET {path}: the answer is not JSON", status=200, retry_after_s=None) from None


def _error(method: str, path: str, status: int, headers: Mapping[str, str], body: bytes) -> ForgeApiError:
    text = body[:300].decode("utf-8", errors="replace").strip()
    wait: float | None = None
    if status >= 500 or _rate_limited(status, headers):
        wait = retry_after(headers)
        wait = DEFAULT_RETRY_S if wait is None else wait
    return ForgeApiError(f"{method} {path}: HTTP {status}: {text}", status=status, retry_after_s=wait)
