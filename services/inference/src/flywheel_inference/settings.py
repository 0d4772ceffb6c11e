"""Typed settings of the inference service (env prefix FLYWHEEL_INFERENCE_, nesting with __)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings

from flywheel_common.settings import (
    AuthSettings,
    EvidenceSettings,
    GrpcSettings,
    KafkaSettings,
    LoggingSettings,
    MetricsSettings,
    TracingSettings,
    env_config,
)
from flywheel_model.runtime import OrtSettings


class LimitSettings(BaseModel):
    """Bounds on requests and generation; requests outside them get INVALID_ARGUMENT."""

    max_question_chars: int = Field(default=1000, ge=1)
    max_page_bytes: int = Field(default=2 * 1024 * 1024, ge=1)
    max_url_chars: int = Field(default=4096, ge=1)
    # A longer page.title is refused; a longer <title> in the HTML is cut (it is page content).
    max_title_chars: int = Field(default=512, ge=1)
    max_session_id_chars: int = Field(default=256, ge=1)
    default_max_new_tokens: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    max_temperature: float = Field(default=2.0, gt=0)
    # Requests waiting or running across all loaded versions; more gets RESOURCE_EXHAUSTED.
    max_in_flight: int = Field(default=64, ge=1)
    # Sequences decoded together in one step.
    max_batch: int = Field(default=16, ge=1)
    # Prompt tokens given to page passages.
    context_token_budget: int = Field(default=400, ge=32)
    passage_max_words: int = Field(default=80, ge=8)
    # Candidate answers of a greedy request; the one its passages say among the most of the question's
    # words is given (flywheel_model.candidates). 1 answers greedily. The evaluator's must match.
    answer_candidates: int = Field(default=4, ge=1)
    # Used when the client sets no deadline.
    default_timeout_s: float = Field(default=120.0, gt=0)


class RedactionSettings(BaseModel):
    """Personal data is redacted from every interaction before it leaves the service."""

    # Off only for a deployment that must keep raw text (and says so in its privacy notice).
    enabled: bool = True
    # Run Presidio's pattern recognizers after the built-in ones.
    presidio: bool = True
    # Keep page URLs' query strings and fragments (where `?token=` and `?email=` live).
    keep_url_query: bool = False


class InferenceSettings(BaseSettings):
    """Everything the inference service reads from its environment."""

    model_config = env_config("FLYWHEEL_INFERENCE_")

    grpc: GrpcSettings = GrpcSettings(port=50051)
    metrics: MetricsSettings = MetricsSettings(port=9101)
    tracing: TracingSettings = TracingSettings()
    logging: LoggingSettings = LoggingSettings()
    kafka: KafkaSettings = KafkaSettings(client_id="flywheel-inference")
    # Log every interaction to Kafka.
    kafka_enabled: bool = True
    # Interactions held while the broker is unreachable; beyond that they are counted as dropped.
    interaction_buffer: int = Field(default=10_000, ge=1)
    redaction: RedactionSettings = RedactionSettings()
    ort: OrtSettings = OrtSettings()
    limits: LimitSettings = LimitSettings()
    # Tokens of callers that may name their visitor's network (the gateway's user token); any known
    # token does. An anonymous caller counts in its own address's network (`evidence`).
    auth: AuthSettings = AuthSettings()
    evidence: EvidenceSettings = EvidenceSettings()
    artifact_root: Path = Path("var/artifacts")
    # Serve this model folder (ONNX + tokenizer) as version "local" instead of the registry's.
    model_dir: Path | None = None
    # How often the registry's rollout state is checked.
    registry_poll_s: float = Field(default=1.0, gt=0)
    query_id_key_file: Path | None = None
    pseudonym_key_file: Path | None = None
