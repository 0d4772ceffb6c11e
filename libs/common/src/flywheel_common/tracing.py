"""OpenTelemetry tracing set up from settings: OTLP export when an endpoint is configured."""

from __future__ import annotations

import logging

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

from flywheel_common.settings import TracingSettings

log = logging.getLogger(__name__)


def configure_tracing(settings: TracingSettings, service: str) -> TracerProvider:
    """Installs the global tracer provider; spans are only exported when an endpoint is set."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"flywheel-{service}"}),
        sampler=ParentBasedTraceIdRatio(settings.sample_ratio),
    )
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
        log.info("tracing to %s", settings.otlp_endpoint)
    trace.set_tracer_provider(provider)
    return provider
