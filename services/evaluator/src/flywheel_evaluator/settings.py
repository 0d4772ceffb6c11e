"""Typed settings of the evaluator (env prefix FLYWHEEL_EVALUATOR_, nesting with __)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
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
from flywheel_model.prompt import NO_ANSWER
from flywheel_model.runtime import OrtSettings


class GoldenSettings(BaseModel):
    """The golden set(s): datasets in the project's format, and the split the gate uses."""

    dataset: Path = Path("datasets/python-faq")
    # More golden sets, evaluated together with the first (same split).
    extra_datasets: list[Path] = Field(default_factory=list)
    split: Literal["traffic", "exam", "gate"] = "gate"
    # Use only the first N items of each set (0 = all): quick checks and tests.
    limit: int = Field(default=0, ge=0)


class EvaluationSettings(BaseModel):
    """How a version is run over the golden set; the engine limits match the inference service's."""

    # The inference service's default answer length, so a version is measured as it serves.
    max_new_tokens: int = Field(default=64, ge=1)
    # Questions in flight at once; the engine batches them into shared decode steps.
    concurrency: int = Field(default=8, ge=1)
    max_batch: int = Field(default=8, ge=1)
    context_token_budget: int = Field(default=400, ge=32)
    passage_max_words: int = Field(default=80, ge=8)
    # The inference service's candidate answers per question (LIMITS__ANSWER_CANDIDATES).
    answer_candidates: int = Field(default=4, ge=1)
    ort: OrtSettings = OrtSettings()
    # An answer containing one of these (after answer normalisation) abstains ("the page does not say").
    abstention_phrases: list[str] = Field(
        default_factory=lambda: [
            NO_ANSWER,
            "does not say",
            "doesn't say",
            "does not mention",
            "doesn't mention",
            "is not mentioned",
            "not stated",
        ]
    )
    bootstrap_resamples: int = Field(default=1000, ge=100)
    seed: int = 0
    # Reuse a stored evaluation of the same version on the same golden set with the same settings
    # (greedy decoding is deterministic), so production is not re-run for every candidate.
    reuse_results: bool = True
    # Evaluate production in the background while idle, so a gate only has to run the candidate.
    prefetch_production: bool = True


class GateSettings(BaseModel):
    """When a candidate may replace production; every check is recorded with its numbers."""

    # The metric a candidate must improve (per-question token F1 by default: it rewards answers that
    # are right and to the point, and on 18-50 questions it tells models apart more reliably than
    # the all-or-nothing accuracy; bench/gate.py measures each rule's error rates).
    primary_metric: Literal["f1", "accuracy", "precision"] = "f1"
    # improve: the primary metric must rise by `margin`, and the paired bootstrap must make "no
    # improvement" unlikely; no_regression: it may not drop by more than `regression_tolerance`.
    policy: Literal["improve", "no_regression"] = "improve"
    margin: float = Field(default=0.02, ge=0, le=1)
    # Largest share of paired-bootstrap resamples in which the candidate is not better.
    max_p_not_better: float = Field(default=0.05, gt=0, le=1)
    regression_tolerance: float = Field(default=0.02, ge=0, le=1)
    # Non-inferiority of the other quality metrics: each may be worse than production by at most its
    # tolerance, judged by the share of paired-bootstrap resamples in which it is worse by more
    # (at most `max_p_inferior`; 0.5 is "more likely within the bound than not").
    accuracy_tolerance: float = Field(default=0.05, ge=0, le=1)
    precision_tolerance: float = Field(default=0.03, ge=0, le=1)
    f1_tolerance: float = Field(default=0.03, ge=0, le=1)
    max_p_inferior: float = Field(default=0.5, gt=0, le=1)
    # p95 of the time to a full answer on the golden set (under the evaluation's concurrency).
    latency_p95_slo_ms: float = Field(default=60_000, gt=0)
    # Safety on unanswerable questions: fabricated answers allowed beyond production's count,
    # and an absolute cap on the candidate's fabrication rate (1 = no cap).
    max_extra_fabrications: int = Field(default=0, ge=0)
    max_fabrication_rate: float = Field(default=1.0, ge=0, le=1)
    # Questions the candidate failed to answer at all (errors); any is a failure by default.
    max_error_rate: float = Field(default=0.0, ge=0, le=1)


class CanarySettings(BaseModel):
    """The canary phase after a passed gate: its share of sessions and what decides it."""

    # False: a candidate that passes the gate goes straight to production (no live traffic expected).
    enabled: bool = True
    fraction: float = Field(default=0.25, gt=0, le=1)
    # Distinct sessions with live feedback (ratings, thumbs, ignores) each of canary and production
    # needs in the window; one session's many events are one voice (docs/security.md). With 8 a side
    # a fifth of canaries as good as production were rolled back, with 16 a twelfth (bench/canary.py).
    min_samples: int = Field(default=16, ge=1)
    # Voters on one signal both sides need before that signal is compared (error rate and latency:
    # voters served); below it the signal is undecided, not worse.
    min_signal_samples: int = Field(default=5, ge=1)
    # The canary is promoted no earlier than this, and decided no later than this.
    min_duration_s: float = Field(default=30.0, ge=0)
    max_duration_s: float = Field(default=600.0, gt=0)
    # What happens when `max_duration_s` passes without enough samples (the gate has passed).
    undecided_action: Literal["promote", "rollback", "hold"] = "promote"
    check_interval_s: float = Field(default=2.0, gt=0)
    # How much worse than production the canary may be before it is rolled back.
    rating_tolerance: float = Field(default=0.3, ge=0)
    thumbs_down_tolerance: float = Field(default=0.10, ge=0, le=1)
    ignore_rate_tolerance: float = Field(default=0.10, ge=0, le=1)
    error_rate_tolerance: float = Field(default=0.02, ge=0, le=1)
    # Relative: the canary's latency per voter (each voter's geometric-mean answer time, averaged over
    # voters) may exceed production's by this share, judged once both sides have `min_signal_samples`
    # voters and `min_latency_samples` timed answers. It was a p95 over answers: one answer that
    # waited behind a model load rolled a better canary back, and one client's slow questions could
    # too. The gate checks the p95 SLO.
    latency_p95_tolerance: float = Field(default=0.5, ge=0)
    min_latency_samples: int = Field(default=20, ge=1)
    # A signal rolls back only when its drop exceeds the tolerance by this many standard errors
    # (1.64: one-sided 95%, a non-inferiority test), so a handful of unlucky sessions does not sink a
    # good canary; 0 judges the point estimates alone.
    confidence_z: float = Field(default=1.64, ge=0)

    # Refused at start: under these a canary is never compared with production, so it waits forever
    # (`hold`) or is decided at `max_duration_s` without evidence.
    @model_validator(mode="after")
    def _decidable(self) -> CanarySettings:
        if self.enabled and self.fraction >= 1:
            raise ValueError(
                "canary.fraction must be below 1 while the canary is enabled: at 1 production serves no "
                "session and the canary is never compared with it (set canary.enabled=false to skip it)"
            )
        if self.min_duration_s > self.max_duration_s:
            raise ValueError(
                f"canary.min_duration_s ({self.min_duration_s:g} s) is above canary.max_duration_s "
                f"({self.max_duration_s:g} s): the canary would be decided before it may be promoted"
            )
        return self


class LiveSettings(BaseModel):
    """Live signals from the feedback and interaction topics."""

    # Live signals kept (per minute, per version) and the window of the live gauges.
    retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    gauge_window_s: float = Field(default=3600, gt=0)
    # Interactions carry latency and the finish reason (errors); off: feedback only.
    consume_interactions: bool = True


class RetentionSettings(BaseModel):
    """Which model versions keep their weights (`ModelRegistry.prune`, hourly): besides production,
    the canary, the previous production, the base and candidates not yet gated, the newest
    `keep_latest`. A candidate with merged weights and its ONNX export is 1-3 GB."""

    enabled: bool = True
    keep_latest: int = Field(default=5, ge=0)


class EvaluatorSettings(BaseSettings):
    """Everything the evaluator reads from its environment."""

    model_config = env_config("FLYWHEEL_EVALUATOR_")

    grpc: GrpcSettings = GrpcSettings(port=50054)
    metrics: MetricsSettings = MetricsSettings(port=9104)
    tracing: TracingSettings = TracingSettings()
    logging: LoggingSettings = LoggingSettings()
    kafka: KafkaSettings = KafkaSettings(client_id="flywheel-evaluator")
    auth: AuthSettings = AuthSettings()
    # Verifies the feedback service's signature on each Feedback event before it counts as a live
    # signal (docs/security.md); the development key when unset.
    event_signing_key_file: Path | None = None
    # Pseudonymises the session id a ForgetSession request names (the key inference and feedback
    # use); the development key when unset.
    pseudonym_key_file: Path | None = None
    # Inference signs Interaction events with a key derived from the query-id key; the development
    # key when unset.
    query_id_key_file: Path | None = None
    artifact_root: Path = Path("var/artifacts")
    # The evaluator's own state (live signal counters, canary start times).
    state_dir: Path = Path("var/evaluator")
    golden: GoldenSettings = GoldenSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    gate: GateSettings = GateSettings()
    canary: CanarySettings = CanarySettings()
    live: LiveSettings = LiveSettings()
    retention: RetentionSettings = RetentionSettings()
    consumer_group: str = "flywheel-evaluator"
    # A candidate's evaluation runs inside the poll loop; the group must not evict it meanwhile.
    max_poll_interval_ms: int = Field(default=1_800_000, ge=10_000)
    # Create missing topics at start (turn off where the platform team owns topics).
    create_topics: bool = True

    @model_validator(mode="after")
    def _live_signals_outlast_a_canary(self) -> EvaluatorSettings:
        # A canary is judged on the signals since it started; pruned ones would be missing from it.
        if self.canary.enabled and self.live.retention_s < self.canary.max_duration_s:
            raise ValueError(
                f"live.retention_s ({self.live.retention_s:g} s) is shorter than canary.max_duration_s "
                f"({self.canary.max_duration_s:g} s): a canary's early signals would be pruned before "
                "it is decided"
            )
        return self
