"""The interaction sink without a broker: one bound in all, and a shutdown that counts what it leaves."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from flywheel_common.dev_secrets import DEV_QUERY_ID_KEY
from flywheel_common.settings import KafkaSettings
from flywheel_inference import interactions
from flywheel_inference.settings import InferenceSettings, RedactionSettings
from flywheel_proto.flywheel.events.v1 import events_pb2


def dropped() -> float:
    return REGISTRY.get_sample_value("flywheel_inference_interactions_dropped_total") or 0.0


def wait_until(check: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


@pytest.fixture
def redactor_busy(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Clear, the redactor is held (a slow page); set, it goes on."""
    go = threading.Event()
    go.set()
    real = interactions.redact_interaction

    def held(*args: Any, **kwargs: Any) -> Any:
        go.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(interactions, "redact_interaction", held)
    yield go
    go.set()


def sink(buffer: int) -> interactions.KafkaInteractionSink:
    # Nothing listens on port 1: what reaches the producer stays in its buffer.
    settings = InferenceSettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1", request_timeout_ms=1000),
        redaction=RedactionSettings(presidio=False),
        interaction_buffer=buffer,
    )
    return interactions.build_sink(settings, DEV_QUERY_ID_KEY)


def publish(s: interactions.KafkaInteractionSink, first: int, count: int) -> None:
    for i in range(first, first + count):
        s.publish(f"q{i}", events_pb2.Interaction(query_id=f"q{i}", question="Q?", answer="A"))


def test_what_waits_for_redaction_and_what_waits_for_kafka_share_one_bound(
    redactor_busy: threading.Event,
) -> None:
    s = sink(buffer=5)
    try:
        publish(s, 0, 5)
        assert wait_until(lambda: s.producer.buffered == 5), "Kafka is down: the five wait in its buffer"
        redactor_busy.clear()
        before = dropped()
        publish(s, 5, 6)
        assert dropped() - before == 6, "the buffer was full: nothing more may wait for redaction"
        assert s.held == 5
    finally:
        redactor_busy.set()
        s.close(timeout_s=0.5)


def test_close_is_bounded_and_counts_what_still_waits_for_redaction(
    redactor_busy: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    s = sink(buffer=100)
    redactor_busy.clear()
    before = dropped()
    publish(s, 0, 4)
    assert wait_until(lambda: s._queue.qsize() == 3), "one is being redacted, three wait"
    started = time.monotonic()
    s.close(timeout_s=1.0)
    assert time.monotonic() - started < 1.0 + 3.5
    assert dropped() - before == 3
    assert "dropped 3 interactions event(s): still waiting for redaction at shutdown" in caplog.text
    # The one the redactor held finds the producer closed: it is counted too, none goes unaccounted.
    redactor_busy.set()
    assert wait_until(lambda: dropped() - before == 4)
