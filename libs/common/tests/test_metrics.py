"""Metric helpers: known label values exported at zero before their first event."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

from flywheel_common.metrics import with_label_values


def test_known_label_values_are_exported_at_zero() -> None:
    registry = CollectorRegistry()
    jobs = with_label_values(Counter("jobs", "Jobs by state.", ["state"], registry=registry), "ok", "failed")
    text = generate_latest(registry).decode()
    assert 'jobs_total{state="ok"} 0.0' in text and 'jobs_total{state="failed"} 0.0' in text
    jobs.labels("failed").inc()
    assert 'jobs_total{state="failed"} 1.0' in generate_latest(registry).decode()
