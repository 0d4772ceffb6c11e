"""Settings models every service nests in its own typed settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict


def env_config(prefix: str) -> SettingsConfigDict:
    """The pydantic-settings config of a service: env prefix, nested delimiter, no .env magic."""
    return SettingsConfigDict(env_prefix=prefix, env_nested_delimiter="__", extra="forbid")


class AuthSettings(BaseModel):
    """Bearer tokens and their roles (user, expert, admin)."""

    # A JSON or YAML file mapping token -> role; the development file when unset.
    tokens_file: Path | None = None


class EvidenceSettings(BaseModel):
    """The network a client counts in. Live evidence (canary votes, agreeing positives, how many
    asked a question) counts one voter per network, so sessions made by the hundred from one network
    are one voice (docs/security.md)."""

    # False: every session is a voter of its own.
    enabled: bool = True
    # The block an address counts in: a /24 is one site's or one provider's customer's IPv4 range,
    # a /48 one site's IPv6 allocation. Longer prefixes count more voters behind one network.
    ipv4_prefix_length: int = Field(default=24, ge=8, le=32)
    ipv6_prefix_length: int = Field(default=48, ge=16, le=128)


class GrpcSettings(BaseModel):
    """Where and how a gRPC server listens."""

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # Seconds in-flight calls get to finish on shutdown; the chart's terminationGracePeriodSeconds is longer.
    grace_s: float = Field(default=20.0, ge=0)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # SO_REUSEPORT: off, so a second server on a taken port fails instead of sharing it by accident;
    # on where several worker processes serve one port on purpose (the feedback service's workers).
    reuse_port: bool = False


class MetricsSettings(BaseModel):
    """The Prometheus /metrics HTTP endpoint; port 0 disables it."""

    host: str = "127.0.0.1"
    port: int = Field(default=9101, ge=0, le=65535)


class TracingSettings(BaseModel):
    """OpenTelemetry tracing: spans go to an OTLP endpoint when one is set, nowhere otherwise."""

    otlp_endpoint: str | None = None
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)


class LoggingSettings(BaseModel):
    """Log level and format (JSON lines unless told otherwise)."""

    level: str = "INFO"
    json_format: bool = True


class TopicSettings(BaseModel):
    """Versioned Kafka topic names."""

    interactions: str = "flywheel.interactions.v1"
    feedback: str = "flywheel.feedback.v1"
    candidates: str = "flywheel.model-candidates.v1"
    decisions: str = "flywheel.gate-decisions.v1"
    dead_letter: str = "flywheel.dead-letter.v1"


class KafkaSettings(BaseModel):
    """How to reach Kafka; SASL and SSL options are used when the protocol asks for them."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    client_id: str = "flywheel"
    topics: TopicSettings = TopicSettings()
    partitions: int = Field(default=3, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    retention_ms: int = Field(default=14 * 24 * 3600 * 1000, ge=-1)
    request_timeout_ms: int = Field(default=10_000, ge=100)
