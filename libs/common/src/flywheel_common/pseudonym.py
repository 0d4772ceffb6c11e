"""Keyed pseudonyms for user and session ids: stable per key, not reversible without it."""

from __future__ import annotations

import hashlib
import hmac


def pseudonymise(key: bytes, value: str, *, domain: str = "id") -> str:
    """A 32-hex-digit keyed hash of `value`; empty stays empty."""
    if not value:
        return ""
    return hmac.new(key, f"{domain}:{value}".encode(), hashlib.sha256).hexdigest()[:32]
