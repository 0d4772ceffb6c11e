"""Bearer tokens (or their SHA-256 hashes) from a secret file mapped to roles; dev tokens in development."""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from flywheel_common.errors import PermissionDenied, Unauthenticated
from flywheel_common.secrets import require_development
from flywheel_proto.flywheel.events.v1 import events_pb2

log = logging.getLogger(__name__)

DEV_TOKENS_FILE = Path(__file__).with_name("dev_tokens.json")


class Role(enum.Enum):
    """What a token may do: users send feedback, experts (and admins) also send corrections."""

    USER = "user"
    EXPERT = "expert"
    ADMIN = "admin"

    @property
    def reviewer_role(self) -> events_pb2.ReviewerRole.ValueType:
        """The role as written in the Feedback event."""
        return {
            Role.USER: events_pb2.REVIEWER_ROLE_USER,
            Role.EXPERT: events_pb2.REVIEWER_ROLE_EXPERT,
            Role.ADMIN: events_pb2.REVIEWER_ROLE_ADMIN,
        }[self]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller; `token_hash` identifies it without keeping the token."""

    token_hash: str
    role: Role

    def require(self, *roles: Role) -> None:
        """PermissionDenied unless the caller has one of `roles`."""
        if self.role not in roles:
            wanted = " or ".join(r.value for r in roles)
            raise PermissionDenied(f"this call needs the {wanted} role")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# A tokens file may name a token by its hash instead (`sha256:<64 hex digits>: role`), so a
# service that only verifies tokens never holds them.
HASH_PREFIX = "sha256:"
_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def load_tokens(path: Path | None) -> dict[str, str]:
    """Reads `{token or sha256:<hash>: role}` from a JSON or YAML file (in development mode, the
    development file when no path is given; in production mode that is MissingSecret)."""
    if path is None:
        require_development("tokens file", "auth.tokens_file")
        log.warning("no tokens file configured: using the development tokens in %s", DEV_TOKENS_FILE)
        path = DEV_TOKENS_FILE
    text = Path(path).read_text()
    data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"tokens file {path} must map tokens to roles")
    return {str(token): str(role) for token, role in data.items()}


class Authenticator:
    """Checks `authorization: Bearer <token>` metadata; tokens are held only as SHA-256 hashes."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._roles: dict[str, Role] = {}
        for token, role in tokens.items():
            if token.startswith(HASH_PREFIX):
                if not _HASH.fullmatch(token):
                    raise ValueError("a token hash must be sha256: and 64 lower-case hex digits")
                token_hash = token.removeprefix(HASH_PREFIX)
            elif len(token) < 8:
                raise ValueError("tokens must be at least 8 characters")
            else:
                token_hash = _hash(token)
            try:
                self._roles[token_hash] = Role(role.lower())
            except ValueError as exc:
                raise ValueError(f"unknown role {role!r}; use user, expert or admin") from exc

    def authenticate(self, metadata: Mapping[str, str]) -> Principal:
        """The caller behind the metadata; Unauthenticated without a known bearer token."""
        value = metadata.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if not value or scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing bearer token (metadata `authorization: Bearer <token>`)")
        token_hash = _hash(token.strip())
        role = self._roles.get(token_hash)
        if role is None:
            raise Unauthenticated("unknown bearer token")
        return Principal(token_hash=token_hash, role=role)
