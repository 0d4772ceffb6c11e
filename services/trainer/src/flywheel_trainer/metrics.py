"""The trainer's Prometheus metrics (the chart's alerts and loop dashboard query these names)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from flywheel_common.metrics import with_label_values

JOBS = with_label_values(
    Counter(
        "flywheel_trainer_jobs",
        "Training jobs by state reached: queued, launched, succeeded, failed.",
        ["state"],
    ),
    "queued",
    "launched",
    "succeeded",
    "failed",
)
JOBS_CURRENT = Gauge("flywheel_trainer_jobs_current", "Training jobs now queued or running.", ["state"])
JOB_DURATION = Histogram(
    "flywheel_trainer_job_duration_seconds",
    "Time from launch to the end of a training job, by outcome.",
    ["outcome"],
    buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800),
)
EXAMPLES = with_label_values(
    Counter(
        "flywheel_trainer_examples",
        "Examples kept from feedback, by source (correction, positive, negative).",
        ["source"],
    ),
    "correction",
    "positive",
    "negative",
)
DATASET_WRITE_FAILURES = Counter(
    "flywheel_trainer_dataset_write_failures",
    "Failed writes of a cut batch's dataset to the artifact store (a full or unwritable disk); retried "
    "every scheduling turn, its job waits meanwhile.",
)
EXAMPLES_PENDING = Gauge("flywheel_trainer_examples_pending", "Training examples waiting for a batch.")
FEEDBACK_DUPLICATES = Counter(
    "flywheel_trainer_duplicates", "Events dropped as already stored (redeliveries, retried submissions)."
)
BATCH_EXAMPLES = Histogram(
    "flywheel_trainer_batch_examples",
    "Training examples per batch cut into a dataset.",
    buckets=(1, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
TRAINING_LOSS = Gauge(
    "flywheel_trainer_training_loss",
    "Mean training loss (answer tokens) of the last finished job, in its first and last epoch.",
    ["epoch"],
)
CONSUMER_LAG = Gauge(
    "flywheel_trainer_consumer_lag",
    "Records the consumer is behind the end of each partition.",
    ["topic", "partition"],
)
CANDIDATES = Counter("flywheel_trainer_candidates", "ModelCandidate events emitted by the trainer.")
FEEDBACK_UNSIGNED = Counter(
    "flywheel_trainer_feedback_unsigned",
    "Feedback events without a valid signature of the feedback service, sent to the dead-letter topic.",
)
INTERACTIONS_UNSIGNED = Counter(
    "flywheel_trainer_interactions_unsigned",
    "Interaction events without a valid signature of inference, sent to the dead-letter topic.",
)
FEEDBACK_STALE = Counter(
    "flywheel_trainer_feedback_stale",
    "Feedback events older than the retention window (a replay of what was purged), dropped.",
)
INTERACTIONS_STALE = Counter(
    "flywheel_trainer_interactions_stale",
    "Interaction events older than the retention window (a replay of what was purged), dropped.",
)
FEEDBACK_UNJOINED = Counter(
    "flywheel_trainer_feedback_unjoined",
    "Feedback purged at the end of the retention window without ever joining its interaction.",
)
FORGOTTEN = Counter(
    "flywheel_trainer_forgotten_sessions", "Sessions forgotten on request (ForgetSession), with their data."
)
