"""Secrets read from files (mounted Kubernetes Secrets); development defaults only in development mode."""

from __future__ import annotations

import enum
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# One variable for every service, read when a secret is loaded (at start-up, never at import):
# images and the chart set `production`; a source checkout runs in development.
MODE_ENV = "FLYWHEEL_MODE"


class Mode(enum.Enum):
    """Production refuses to start without its secrets; development falls back to public dev keys."""

    PRODUCTION = "production"
    DEVELOPMENT = "development"


class MissingSecret(RuntimeError):
    """A secret the service needs is not configured, and the mode allows no default."""


def deployment_mode() -> Mode:
    """The mode from FLYWHEEL_MODE (development when unset); an unknown value is an error."""
    value = os.environ.get(MODE_ENV, Mode.DEVELOPMENT.value).strip().lower()
    try:
        return Mode(value)
    except ValueError as exc:
        raise MissingSecret(f"{MODE_ENV}={value!r}: use production or development") from exc


def require_development(name: str, setting: str) -> None:
    """MissingSecret unless in development mode, where the caller may use its development default."""
    if deployment_mode() is Mode.PRODUCTION:
        raise MissingSecret(
            f"no {name} configured ({setting}): {MODE_ENV} is production, where the public development "
            f"defaults are refused. Mount the secret (docs/deploy.md, 'Secrets'), or set "
            f"{MODE_ENV}=development for a local run."
        )


def read_secret(path: Path | None, *, name: str, dev_default: bytes | None = None) -> bytes:
    """Returns the secret in `path`; without a path, the development default (development mode only)."""
    if path is not None:
        value = Path(path).read_bytes().strip()
        if not value:
            raise MissingSecret(f"secret file for {name} is empty: {path}")
        return value
    if dev_default is None:
        raise MissingSecret(f"no secret file configured for {name}")
    require_development(name, "its *_key_file setting")
    log.warning("no secret file for %s: using the development key; never do this in production", name)
    return dev_default
