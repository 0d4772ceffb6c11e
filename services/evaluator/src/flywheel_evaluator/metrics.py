"""The evaluator's Prometheus metrics (the chart's dashboards and alerts query these names)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from flywheel_common.metrics import with_label_values
from flywheel_common.registry import RolloutState

EVALUATIONS = with_label_values(
    Counter(
        "flywheel_evaluator_evaluations",
        "Golden-set evaluations run, by outcome (ok, error, cancelled).",
        ["outcome"],
    ),
    "ok",
    "error",
    "cancelled",
)
EVALUATION_STARTED = Gauge(
    "flywheel_evaluator_evaluation_started_timestamp_seconds",
    "When the evaluation now running started (Unix time); 0 while none runs.",
)
EVALUATION_DURATION = Histogram(
    "flywheel_evaluator_evaluation_duration_seconds",
    "Time to evaluate one version on the golden set, model load included.",
    buckets=(10, 30, 60, 90, 120, 180, 300, 600, 1200, 1800),
)
GATE_DECISIONS = with_label_values(
    Counter(
        "flywheel_evaluator_gate_decisions",
        "Gate decisions on candidates, by outcome (passed, failed).",
        ["outcome"],
    ),
    "passed",
    "failed",
)
ACCURACY = Gauge(
    "flywheel_evaluator_accuracy",
    "Golden-set accuracy of a version, by role (production, canary, candidate).",
    ["version", "role"],
)
PRECISION = Gauge(
    "flywheel_evaluator_precision",
    "Golden-set token precision of a version, by role (production, canary, candidate).",
    ["version", "role"],
)
F1 = Gauge(
    "flywheel_evaluator_f1",
    "Golden-set F1 of a version, by role (production, canary, candidate).",
    ["version", "role"],
)
ROLLOUT_STATE = Gauge(
    "flywheel_evaluator_rollout_state",
    "Rollout state: 0 no production model, 1 stable, 2 canary running, "
    "3 frozen (pinned or automatic rollout off).",
)
CANARY_FRACTION = Gauge("flywheel_evaluator_canary_fraction", "Share of sessions routed to the canary.")
ROLLBACKS = with_label_values(
    Counter(
        "flywheel_evaluator_rollbacks",
        "Rollbacks, by trigger (auto: bad live signals; admin).",
        ["trigger"],
    ),
    "auto",
    "admin",
)
PROMOTIONS = with_label_values(
    Counter(
        "flywheel_evaluator_promotions",
        "Versions made production, by trigger (gate, canary, admin).",
        ["trigger"],
    ),
    "gate",
    "canary",
    "admin",
)
LIVE_MEAN_RATING = Gauge(
    "flywheel_evaluator_live_mean_rating",
    "Users' mean rating (1-5) of a serving version over the live window.",
    ["version"],
)
LIVE_THUMBS_DOWN_RATE = Gauge(
    "flywheel_evaluator_live_thumbs_down_rate",
    "Share of thumbs-down among thumbs of a serving version over the live window.",
    ["version"],
)
LIVE_IGNORE_RATE = Gauge(
    "flywheel_evaluator_live_ignore_rate",
    "Share of a serving version's answers that were ignored, over the live window.",
    ["version"],
)
LIVE_FEEDBACK = Gauge(
    "flywheel_evaluator_live_feedback_events",
    "Feedback events (ratings, thumbs, ignores) on a serving version over the live window.",
    ["version"],
)
LIVE_VOTERS = Gauge(
    "flywheel_evaluator_live_voters",
    "Distinct voters with feedback on a serving version over the live window: what shares a session "
    "or a client network counts once (the canary's evidence).",
    ["version"],
)
PRUNED_BYTES = Counter(
    "flywheel_evaluator_pruned_bytes",
    "Bytes of model weights freed by retention (versions nothing needs any more).",
)
FEEDBACK_UNSIGNED = Counter(
    "flywheel_evaluator_feedback_unsigned",
    "Feedback events without the feedback service's valid signature, dead-lettered uncounted.",
)
FORGOTTEN = Counter(
    "flywheel_evaluator_forgotten_sessions",
    "Sessions forgotten on request (ForgetSession): their live votes and served rows deleted.",
)
INTERACTIONS_UNSIGNED = Counter(
    "flywheel_evaluator_interactions_unsigned",
    "Interaction events without inference's valid signature, dead-lettered uncounted.",
)
SIGNALS = Counter(
    "flywheel_evaluator_live_signals",
    "Live signals consumed, by kind (rating, thumbs, ignored, interaction).",
    ["kind"],
)


def rollout_state_value(state: RolloutState) -> int:
    """The rollout state as one number (see the gauge's help)."""
    if state.production is None:
        return 0
    if state.pinned or not state.auto_rollout:
        return 3
    return 2 if state.canary else 1
