"""Typed settings of the feedback service (env prefix FLYWHEEL_FEEDBACK_, nested with __)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings

from flywheel_common.settings import (
    AuthSettings,
    GrpcSettings,
    KafkaSettings,
    LoggingSettings,
    MetricsSettings,
    TracingSettings,
    env_config,
)


class ValidationSettings(BaseModel):
    """Bounds on what a submission may contain."""

    # As long as the trainer keeps interactions (its retention_s) and Kafka keeps events: feedback on
    # an answer older than that could never join it, so it is refused (docs/security.md).
    query_id_max_age_s: float = Field(default=14 * 24 * 3600, gt=0)
    # Issued ids are about 100 characters; the signer refuses more than 512 in any case.
    max_query_id_chars: int = Field(default=256, ge=100, le=512)
    max_comment_chars: int = Field(default=2000, ge=1)
    max_correction_chars: int = Field(default=8000, ge=1)
    max_note_chars: int = Field(default=2000, ge=1)
    max_idempotency_key_chars: int = Field(default=128, ge=8)
    max_session_id_chars: int = Field(default=256, ge=8)


class RateLimitSettings(BaseModel):
    """A token bucket per bearer token; 0 disables the limit."""

    per_second: float = Field(default=20.0, ge=0)
    burst: int = Field(default=40, ge=1)


class PrivacySettings(BaseModel):
    """Keys for query id signatures and pseudonyms, and the PII detectors to run."""

    # Shared with the inference service, which signs the query ids it issues.
    query_id_key_file: Path | None = None
    pseudonym_key_file: Path | None = None
    # Signs each Feedback event; the trainer verifies with the same key (docs/security.md).
    event_signing_key_file: Path | None = None
    # Run Microsoft Presidio's pattern recognizers after the built-in ones.
    presidio: bool = True
    presidio_score_threshold: float = Field(default=0.3, ge=0, le=1)


class FeedbackSettings(BaseSettings):
    """Everything the feedback service reads from its environment."""

    model_config = env_config("FLYWHEEL_FEEDBACK_")

    grpc: GrpcSettings = GrpcSettings(port=50052)
    metrics: MetricsSettings = MetricsSettings(port=9102)
    tracing: TracingSettings = TracingSettings()
    logging: LoggingSettings = LoggingSettings()
    kafka: KafkaSettings = KafkaSettings(client_id="flywheel-feedback")
    auth: AuthSettings = AuthSettings()
    validation: ValidationSettings = ValidationSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    privacy: PrivacySettings = PrivacySettings()
    # An RPC waits at most this long for the broker's ack, then answers UNAVAILABLE.
    produce_timeout_ms: int = Field(default=5000, ge=100)
    # Concurrent RPCs' events share a produce request: an event waits while earlier ones await their
    # ack, at most this long (an idle service sends at once).
    linger_ms: int = Field(default=2, ge=0)
    # Accepted idempotency keys remembered, and for how long (retries after that are dropped downstream).
    idempotency_cache_size: int = Field(default=200_000, ge=1)
    idempotency_ttl_s: float = Field(default=24 * 3600, gt=0)
    # Processes serving the gRPC port together (SO_REUSEPORT), each with its own Kafka producer,
    # idempotency cache and rate limiter; more than 1 starts a supervisor (docs/feedback.md, "Workers").
    workers: int = Field(default=1, ge=1, le=32)
    # Create missing topics at start (turn off where the platform team owns topics).
    create_topics: bool = True
