"""Events that carry a role are signed by the service that checked the role; consumers verify them.

Kafka is a trust boundary: anyone who can produce to the feedback topic could otherwise claim the
expert role. The feedback service signs each Feedback event (HMAC-SHA256 over topic, key and value,
with a key only it, the trainer and the evaluator hold); the trainer and the evaluator dead-letter
what is unsigned or badly signed.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from kafka.consumer.fetcher import ConsumerRecord

from flywheel_common.dev_secrets import DEV_EVENT_SIGNING_KEY
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

    def sign(self, topic: str, key: bytes, value: bytes) -> bytes:
        """The signature header's value for a record."""
        body = b"\x00".join([topic.encode(), hashlib.sha256(key).digest(), value])
        return _VERSION + hmac.new(self._key, body, hashlib.sha256).hexdigest().encode()

    def verify(self, topic: str, key: bytes | None, value: bytes | None, signature: bytes | None) -> bool:
        """Whether `signature` is this key's signature of the record."""
        if not signature:
            return False
        return hmac.compare_digest(self.sign(topic, key or b"", value or b""), signature)

    def signed(self, record: ConsumerRecord) -> bool:
        """Whether a consumed record carries this key's signature of it."""
        return self.verify(record.topic, record.key, record.value, header(record, SIGNATURE_HEADER))
