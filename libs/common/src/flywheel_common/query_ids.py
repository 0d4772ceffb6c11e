"""Signed query ids: inference issues them, feedback verifies them without any lookup."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from flywheel_common.errors import InvalidArgument

_PREFIX = "q3"
# Older ids, verified until they expire: q2 carried the session but not the client's network, q1
# neither. The number of dot-separated fields each has.
_FIELDS = {_PREFIX: 7, "q2": 6, "q1": 5}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _field(query_id: str, index: int) -> str:
    parts = query_id.split(".")
    fields = _FIELDS.get(parts[0], 0)
    return parts[index] if len(parts) == fields and index < fields - 1 else ""


def query_id_session(query_id: str) -> str:
    """The session pseudonym a signed (q2, q3) query id names, unverified; "" for any other id.

    For consumers of events the feedback service verified: they need it only to honour forgets.
    """
    return _field(query_id, 4)


def query_id_network(query_id: str) -> str:
    """The pseudonym of the asking client's network a q3 query id names, unverified; "" for any other
    id or an answer asked without one (by anything but the gateway).

    For consumers of signed events: live evidence counts one voter per network (`Voters`).
    """
    return _field(query_id, 5)


class Voters:
    """Who asks and votes count for in live evidence: everything that shares a session or a client
    network (the one its query id names) is one voter, transitively.

    A session seen on two networks (a dual-stack line's IPv4 /24 and IPv6 /48, a phone moving from
    Wi-Fi to mobile data) joins them, and every session of either network, into one voter; a session
    that named no network is a voter of its own. Add every (session, network) pair of the evidence
    first, then ask `of`: components are union-find sets, near-linear in the pairs.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._parent: dict[str, str] = {}
        for session, network in pairs:
            self.add(session, network)

    def _find(self, node: str) -> str:
        self._parent.setdefault(node, node)
        while (parent := self._parent[node]) != node:
            # Path halving: each visited node skips to its grandparent.
            grand = self._parent[parent]
            self._parent[node] = grand
            node = grand
        return node

    @staticmethod
    def _node(session: str, network: str) -> str:
        # No session (an event without one) links nothing: it would join every network it came from.
        return f"n{network}" if network else f"s{session}"

    def add(self, session: str, network: str) -> None:
        """Records that `session` asked or voted from `network` ("" for none named)."""
        node = self._find(self._node(session, network))
        if session and network:
            other = self._find(f"s{session}")
            if other != node:
                self._parent[other] = node

    def of(self, session: str, network: str) -> str:
        """The voter a pair counts for (an opaque key, stable until more pairs are added)."""
        return self._find(self._node(session, network))

    def count(self, pairs: Iterable[tuple[str, str]]) -> int:
        """How many distinct voters the pairs are."""
        return len({self.of(session, network) for session, network in pairs})


def count_voters(pairs: Iterable[tuple[str, str]]) -> int:
    """How many voters (session, network) pairs are: those sharing a session or a network, however
    indirectly, are one."""
    pairs = list(pairs)
    return Voters(pairs).count(pairs)


def like_session(session: str) -> str:
    """A SQL LIKE pattern that every query id naming `session` matches (and a few others may: check
    each with query_id_session)."""
    return f"%.{session}.%"


@dataclass(frozen=True)
class QueryIdClaims:
    """What a valid query id says about the answer it names."""

    query_id: str
    nonce: str
    issued_at: int
    model_version: str
    # Pseudonym of the session that asked ("" for a request without a session, or a q1 id).
    session_pseudonym: str = ""
    # Pseudonym of the asking client's network ("" when the caller named none, or an older id).
    network_pseudonym: str = ""


class QueryIdSigner:
    """Issues and verifies `q3.<nonce>.<issued_at>.<version>.<session>.<network>.<signature>` ids
    (HMAC-SHA256).

    The session is the asker's keyed pseudonym: feedback on an answer counts as that session's,
    whoever sends it, so one visitor cannot pass for many by naming other sessions. The network is
    the keyed pseudonym of the asking client's address block, which the gateway names: many sessions
    from one network are one voter in live evidence (docs/security.md).
    """

    def __init__(self, key: bytes, *, max_age_s: float = 14 * 24 * 3600) -> None:
        if len(key) < 16:
            raise ValueError("the query id key must be at least 16 bytes")
        self._key = key
        self._max_age_s = max_age_s

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest()[:16])

    def issue(
        self,
        model_version: str,
        session_pseudonym: str = "",
        network_pseudonym: str = "",
        *,
        now: float | None = None,
    ) -> str:
        """A new unique query id bound to the model version that answered and the session (and the
        client's network) that asked."""
        if not all(c in "0123456789abcdef" for c in session_pseudonym + network_pseudonym):
            raise ValueError("session and network pseudonyms are lowercase hex")
        issued = int(time.time() if now is None else now)
        body = ".".join(
            [
                _PREFIX,
                secrets.token_hex(12),
                str(issued),
                _b64(model_version.encode()),
                session_pseudonym,
                network_pseudonym,
            ]
        )
        return f"{body}.{self._sign(body)}"

    def verify(self, query_id: str, *, now: float | None = None) -> QueryIdClaims:
        """The claims of a query id this service family issued; InvalidArgument otherwise."""
        parts = query_id.split(".")
        fields = _FIELDS.get(parts[0])
        # Issued ids are ASCII; compare_digest raises TypeError on non-ASCII str, so check first.
        if fields is None or len(parts) != fields or len(query_id) > 512 or not query_id.isascii():
            raise InvalidArgument("malformed query id")
        body, signature = ".".join(parts[:-1]), parts[-1]
        if not hmac.compare_digest(self._sign(body).encode(), signature.encode()):
            raise InvalidArgument("query id was not issued by this service")
        try:
            issued = int(parts[2])
            version = _unb64(parts[3]).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument("malformed query id") from exc
        age = (time.time() if now is None else now) - issued
        if age > self._max_age_s:
            raise InvalidArgument("query id has expired")
        if age < -300:
            raise InvalidArgument("query id was issued in the future")
        return QueryIdClaims(
            query_id=query_id,
            nonce=parts[1],
            issued_at=issued,
            model_version=version,
            session_pseudonym=_field(query_id, 4),
            network_pseudonym=_field(query_id, 5),
        )
