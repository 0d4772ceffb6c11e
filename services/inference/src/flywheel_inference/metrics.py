"""The inference service's Prometheus metrics (the chart's alerts and serving dashboard query these names)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
TTFT = Histogram(
    "flywheel_inference_time_to_first_token_seconds",
    "Time from request to the first generated token, by model version.",
    ["version"],
    buckets=_LATENCY_BUCKETS,
)
DURATION = Histogram(
    "flywheel_inference_request_duration_seconds",
    "Time from request to the last token, by model version.",
    ["version"],
    buckets=_LATENCY_BUCKETS,
)
TOKENS = Counter("flywheel_inference_tokens_generated", "Tokens generated, by model version.", ["version"])
DRAFTED = Counter(
    "flywheel_inference_drafted_tokens",
    "Tokens drafted from the prompt and checked in a decode step, by model version and whether the "
    "model agreed (accepted) or not (rejected).",
    ["version", "outcome"],
)

QUEUE_DEPTH = Gauge("flywheel_inference_queue_depth", "Requests waiting or being generated.")
ANSWERS = Counter(
    "flywheel_inference_answers",
    "Answers finished, by model version and finish reason.",
    ["version", "reason"],
)
MODEL_INFO = Gauge(
    "flywheel_inference_model_info",
    "Model versions loaded, by role (production/canary) and execution provider (1 = loaded).",
    ["version", "role", "provider"],
)
INTERACTIONS_BUFFERED = Gauge(
    "flywheel_inference_interactions_buffered", "Interactions accepted but not yet acknowledged by Kafka."
)
INTERACTIONS_DROPPED = Counter(
    "flywheel_inference_interactions_dropped", "Interactions dropped because the buffer was full."
)
INTERACTIONS_REDACTED = Counter(
    "flywheel_inference_redacted", "Pieces of personal data redacted from interactions, by kind.", ["kind"]
)
INTERACTIONS_REJECTED = Counter(
    "flywheel_inference_interactions_rejected",
    "Interactions Kafka can never take (too large, malformed): dropped at once, never retried.",
)


def record_drafts(version: str, drafted: int, agreed: int) -> None:
    """One decode step's drafts (AnswerEngine's on_check)."""
    DRAFTED.labels(version, "accepted").inc(agreed)
    DRAFTED.labels(version, "rejected").inc(drafted - agreed)
