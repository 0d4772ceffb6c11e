"""Opaque sessions: signed visitor cookies (no server state) and expert logins held in memory."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of a MAC the client sent with ours (ours is ASCII; a non-ASCII one,
    which `compare_digest` would raise on, is simply not it)."""
    return given.isascii() and hmac.compare_digest(given, expected)


def _mac(key: bytes, *parts: str) -> str:
    digest = hmac.new(key, "\x1f".join(parts).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode().rstrip("=")


class VisitorSessions:
    """A visitor's cookie is `<session id>.<HMAC>`: any replica with the key verifies it.

    The session id is what the services get as `session_id`; feedback tickets bind a query id to
    the session that asked, so a visitor can only rate answers given to them.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def new(self) -> tuple[str, str]:
        """A fresh (session id, cookie value)."""
        session_id = secrets.token_urlsafe(18)
        return session_id, f"{session_id}.{_mac(self._key, 'session', session_id)}"

    def verify(self, cookie: str | None) -> str | None:
        """The session id of a cookie this gateway issued; None for anything else."""
        if not cookie or len(cookie) > 128:
            return None
        session_id, _, mac = cookie.partition(".")
        if not session_id or not _same(mac, _mac(self._key, "session", session_id)):
            return None
        return session_id

    def ticket(self, session_id: str, query_id: str) -> str:
        """Proof that `query_id` was answered in `session_id`."""
        return _mac(self._key, "ticket", session_id, query_id)

    def check_ticket(self, session_id: str, query_id: str, ticket: str) -> bool:
        return _same(ticket, self.ticket(session_id, query_id))


@dataclass(frozen=True)
class ExpertSession:
    """A logged-in expert: the bearer token stays on the server, the browser holds a random id."""

    token: str
    expires_at: float


class ExpertSessions:
    """Expert logins by a random cookie value, bounded and expiring (in memory: one replica's)."""

    def __init__(
        self, ttl_s: float, max_sessions: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, ExpertSession] = OrderedDict()

    def create(self, token: str) -> str:
        """Stores a login; returns the cookie value."""
        cookie = secrets.token_urlsafe(32)
        self._sessions[cookie] = ExpertSession(token, self._clock() + self._ttl_s)
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return cookie

    def get(self, cookie: str | None) -> ExpertSession | None:
        """The live session behind a cookie, if any."""
        if not cookie:
            return None
        session = self._sessions.get(cookie)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._sessions[cookie]
            return None
        return session

    def drop(self, cookie: str | None) -> None:
        if cookie:
            self._sessions.pop(cookie, None)
