"""Prometheus metrics shared by every gRPC server, and the /metrics HTTP endpoint."""

from __future__ import annotations

import logging
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from flywheel_common.settings import MetricsSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=MetricWrapperBase)

GRPC_REQUESTS = Counter(
    "flywheel_grpc_requests",
    "gRPC calls handled, by service, method and status code.",
    ["service", "method", "code"],
)
GRPC_DURATION = Histogram(
    "flywheel_grpc_request_duration_seconds",
    "Time to handle a gRPC call, by service and method.",
    ["service", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CONSUMER_RESTARTS = Counter(
    "flywheel_kafka_consumer_restarts",
    "Kafka consumers restarted after an error, by consumer group.",
    ["group"],
)


def with_label_values(metric: M, *values: str) -> M:
    """`metric` (of one label) with a series at zero for each of the label's known values.

    Prometheus cannot see the first increment of a series that appears already counted: increase()
    and rate() of a counter first scraped at 1 are 0, so an alert on "any failure" would miss the
    first one, and a dashboard panel stays empty until something happens.
    """
    for value in values:
        metric.labels(value)
    return metric


def start_metrics_server(settings: MetricsSettings) -> WSGIServer | None:
    """Serves /metrics on its own thread; returns None when disabled (port 0)."""
    if not settings.port:
        return None
    server, _thread = start_http_server(settings.port, addr=settings.host)
    log.info("metrics on http://%s:%d/metrics", settings.host, server.server_port)
    return server
