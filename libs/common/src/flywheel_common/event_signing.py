"""Events are signed by the service that vouches for them; consumers verify them.

Kafka is a trust boundary: anyone who can produce to the feedback topic could otherwise claim the
expert role, and anyone who can produce to the interactions topic could put words in the model's
mouth (or text marked as redacted that was not). The feedback service signs each Feedback event
(HMAC-SHA256 over topic, key and value, with a key only it, the trainer and the evaluator hold);
inference signs each Interaction with a key derived from the query-id key, which it holds anyway,
so it cannot sign feedback. The trainer and the evaluator dead-letter what is unsigned or badly
signed.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from kafka.consumer.fetcher import ConsumerRecord

from flywheel_common.dev_secrets import DEV_EVENT_SIGNING_KEY, DEV_QUERY_ID_KEY
from flywheel_common.kafka import header
from flywheel_common.secrets import read_secret

SIGNATURE_HEADER = "flywheel-signature"
_VERSION = b"v1:"


class EventSigner:
    """Signs and verifies records with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the event signing key must be at least 16 bytes")
        self._key = key

    @classmethod
    def of_key_file(cls, path: Path | None) -> EventSigner:
        """The signer of the key in `path`; the development key when unset (refused in production)."""
        return cls(read_secret(path, name="event signing key", dev_default=DEV_EVENT_SIGNING_KEY))

    @classmethod
    def for_interactions(cls, query_id_key: bytes) -> EventSigner:
        """The signer of Interaction events: a key derived from the query-id key (inference signs
        query ids with it; the trainer and the evaluator mount it to verify interactions)."""
        return cls(hmac.new(query_id_key, b"flywheel:interaction-events", hashlib.sha256).digest())

    @classmethod
    def for_interactions_of_key_file(cls, path: Path | None) -> EventSigner:
        """`for_interactions` of the query-id key in `path`; the development key when unset."""
        return cls.for_interactions(read_secret(path, name="query id key", dev_default=DEV_QUERY_ID_KEY))

    def sign(self, topic: str, key: bytes, value: bytes, context: bytes = b"") -> bytes:
        """The signature header's value for a record; `context` is what else it vouches for (a
        header's meaning, say), and must be given again to verify it."""
        parts = [topic.encode(), hashlib.sha256(key).digest(), value, *([context] if context else [])]
        return _VERSION + hmac.new(self._key, b"\x00".join(parts), hashlib.sha256).hexdigest().encode()

    def verify(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        signature: bytes | None,
        context: bytes = b"",
    ) -> bool:
        """Whether `signature` is this key's signature of the record."""
        if not signature:
            return False
        return hmac.compare_digest(self.sign(topic, key or b"", value or b"", context), signature)

    def signed(self, record: ConsumerRecord, mark: str = "") -> bool:
        """Whether a consumed record carries this key's signature of it (and of whether it carries
        the header `mark`, when one is named: the producer signed with `context=mark` if it did)."""
        context = mark.encode() if mark and header(record, mark) is not None else b""
        return self.verify(record.topic, record.key, record.value, header(record, SIGNATURE_HEADER), context)
