"""The gateway's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from flywheel_common.metrics import with_label_values

REQUESTS = Counter("flywheel_gateway_requests", "HTTP requests by route and status code.", ["route", "code"])
REFUSED = with_label_values(
    Counter(
        "flywheel_gateway_refused",
        "Requests refused before reaching a service, by reason (origin, rate_limit, auth, invalid).",
        ["reason"],
    ),
    "origin",
    "rate_limit",
    "auth",
    "invalid",
)
FIRST_TOKEN = Histogram(
    "flywheel_gateway_answer_first_chunk_seconds",
    "Time from a question reaching the gateway to its first streamed text.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80),
)
