"""Keyed pseudonyms for user and session ids: stable per key, not reversible without it."""

from __future__ import annotations

import hashlib
import hmac

from flywheel_common.errors import InvalidArgument
from flywheel_common.text import has_unsafe

# The longest session id a forget request may name (the services accept no longer ones).
MAX_SESSION_ID_CHARS = 256
_HEX = frozenset("0123456789abcdef")


def pseudonymise(key: bytes, value: str, *, domain: str = "id") -> str:
    """A 32-hex-digit keyed hash of `value`; empty stays empty."""
    if not value:
        return ""
    return hmac.new(key, f"{domain}:{value}".encode(), hashlib.sha256).hexdigest()[:32]


def session_to_forget(key: bytes, session_id: str, session_pseudonym: str) -> str:
    """The session pseudonym a forget request names: exactly one of its raw session id (pseudonymised
    as inference and feedback do) or the pseudonym itself; InvalidArgument otherwise."""
    if bool(session_id) == bool(session_pseudonym):
        raise InvalidArgument("exactly one of session_id and session_pseudonym is required")
    if session_id:
        if len(session_id) > MAX_SESSION_ID_CHARS or has_unsafe(session_id):
            raise InvalidArgument(
                f"session_id must be at most {MAX_SESSION_ID_CHARS} characters without control characters"
            )
        return pseudonymise(key, session_id, domain="session")
    if len(session_pseudonym) != 32 or not set(session_pseudonym) <= _HEX:
        raise InvalidArgument("session_pseudonym must be 32 lowercase hex digits")
    return session_pseudonym


def tombstone(session: str) -> str:
    """What a store keeps of a forgotten session: a hash, so not even its pseudonym stays."""
    return hashlib.sha256(f"forgotten:{session}".encode()).hexdigest()
