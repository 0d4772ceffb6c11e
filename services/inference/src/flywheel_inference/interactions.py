"""Every answer is logged to Kafka after it is sent, through a bounded buffer that survives outages."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from flywheel_common.kafka import BufferedEventProducer
from flywheel_inference.settings import InferenceSettings
from flywheel_proto.flywheel.events.v1 import events_pb2

BUFFERED = Gauge(
    "flywheel_inference_interactions_buffered", "Interactions accepted but not yet acknowledged by Kafka."
)
DROPPED = Counter(
    "flywheel_inference_interactions_dropped", "Interactions dropped because the buffer was full."
)
REJECTED = Counter(
    "flywheel_inference_interactions_rejected",
    "Interactions Kafka can never take (too large, malformed): dropped at once, never retried.",
)


class KafkaInteractionSink:
    """Publishes Interaction events keyed by query id; never blocks or fails an answer."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.topic = settings.kafka.topics.interactions
        self.producer = BufferedEventProducer(
            settings.kafka,
            name="interactions",
            max_buffered=settings.interaction_buffer,
            buffered_gauge=BUFFERED,
            dropped_counter=DROPPED,
            rejected_counter=REJECTED,
        ).start()

    def publish(self, key: str, event: events_pb2.Interaction) -> None:
        self.producer.emit(self.topic, key, event)

    def close(self) -> None:
        self.producer.close()


def build_sink(settings: InferenceSettings) -> KafkaInteractionSink:
    return KafkaInteractionSink(settings)
