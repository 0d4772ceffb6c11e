"""Entry point: `python -m flywheel_feedback` takes feedback over gRPC and stores it on Kafka."""

from __future__ import annotations

import sys

from flywheel_common.runtime import load_settings, run_service
from flywheel_feedback.app import FeedbackApp
from flywheel_feedback.settings import FeedbackSettings
from flywheel_feedback.workers import supervise


def main() -> None:
    settings = load_settings(FeedbackSettings)
    if settings.workers > 1:
        sys.exit(supervise(settings))
    # The PII libraries leave a large heap of long-lived objects: frozen out of the GC's scans.
    run_service(FeedbackApp, lambda: settings, "feedback", freeze_gc=True)


if __name__ == "__main__":
    main()
