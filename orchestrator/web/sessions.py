"""Who may use the HTTP API when `HTTP_TOKEN` is set: a request that carries the token
(`Authorization: Bearer`), or one with a dashboard session made from it (`POST /login`
sets the `orch_session` cookie; a browser's EventSource cannot send headers).

A session is a random id kept here with its expiry (at most `MAX_SESSIONS`, the oldest
goes first), so it reveals nothing about the token and ends with the daemon. The cookie
is HttpOnly, SameSite=Strict, Path=/, and Secure when `PUBLIC_URL` is https. A request
that changes something (not GET or HEAD) on the strength of the cookie must come from
this host's own page: its Origin (or, without one, its Referer) must be this host.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from aiohttp import web

SESSION_COOKIE = "orch_session"
SESSION_TTL_S = 12 * 3600.0
MAX_SESSIONS = 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Sessions:
    """Session ids and their expiry (monotonic), bounded."""

    def __init__(
        self,
        *,
        ttl_s: float = SESSION_TTL_S,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s, self._max, self._clock = ttl_s, max_sessions, clock
        self._expiry: dict[str, float] = {}  # in order of creation

    def open(self) -> str:
        session = secrets.token_urlsafe(32)
        self._expiry[session] = self._clock() + self._ttl_s
        while len(self._expiry) > self._max:
            del self._expiry[next(iter(self._expiry))]
        return session

    def valid(self, session: str) -> bool:
        # A dict lookup on a 256-bit random key leaks no useful timing: guessing is the
        # only attack, and it is hopeless.
        expiry = self._expiry.get(session)
        if expiry is None:
            return False
        if expiry < self._clock():
            del self._expiry[session]
            return False
        return True

    def close(self, session: str) -> None:
        self._expiry.pop(session, None)

    def __len__(self) -> int:
        return len(self._expiry)


class Access:
    """The API's credentials: `token` None means everything is open (loopback default)."""

    def __init__(self, token: str | None, *, public_url: str | None, sessions: Sessions | None = None) -> None:
        self.token = token
        self.sessions = sessions or Sessions()
        self._public_origin = _origin(public_url) if public_url else None
        self.secure_cookie = bool(public_url and public_url.startswith("https://"))

    @property
    def open(self) -> bool:
        return not self.token

    def token_matches(self, given: str) -> bool:
        assert self.token is not None
        # Undecodable bytes arrive as surrogates: encode them back, so any bytes are just wrong.
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode())

    def bearer(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "")
        return given.startswith("Bearer ") and self.token_matches(given[len("Bearer ") :])

    def session(self, request: web.Request) -> str | None:
        """The request's valid session id, if it has one."""
        session = request.cookies.get(SESSION_COOKIE, "")
        return session if session and self.sessions.valid(session) else None

    def same_origin(self, request: web.Request) -> bool:
        """The request comes from a page of this host (Origin, else Referer): this host
        as the browser named it (Host), or its PUBLIC_URL."""
        source = request.headers.get("Origin") or request.headers.get("Referer")
        if not source or source == "null":
            return False
        origin = _origin(source)
        return origin == _origin(f"{request.scheme}://{request.host}") or origin == self._public_origin

    def refusal(self, request: web.Request) -> str | None:
        """Why `request` may not go on (None: it may)."""
        if self.open or self.bearer(request):
            return None
        if self.session(request) is None:
            return "send Authorization: Bearer <HTTP_TOKEN>, or sign in at / for a session cookie"
        if request.method not in SAFE_METHODS and not self.same_origin(request):
            return "a request with the session cookie must come from this host's dashboard (Origin)"
        return None

    def sign_in(self, response: web.StreamResponse) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            self.sessions.open(),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.secure_cookie,
            max_age=int(SESSION_TTL_S),
        )

    def sign_out(self, request: web.Request, response: web.StreamResponse) -> None:
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            self.sessions.close(session)
        response.del_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Strict", secure=self.secure_cookie)


def _origin(url: str) -> str:
    """`scheme://host[:port]`, lower-case, without a default port."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        return ""
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != default else "")
