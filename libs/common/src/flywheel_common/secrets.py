"""Secrets read from files (mounted Kubernetes Secrets), with a loud development fallback."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def read_secret(path: Path | None, *, name: str, dev_default: bytes | None = None) -> bytes:
    """Returns the secret in `path`; without a path, the development default (logged) or an error."""
    if path is not None:
        value = Path(path).read_bytes().strip()
        if not value:
            raise ValueError(f"secret file for {name} is empty: {path}")
        return value
    if dev_default is None:
        raise ValueError(f"no secret file configured for {name}")
    log.warning("no secret file for %s: using the development key; never do this in production", name)
    return dev_default
