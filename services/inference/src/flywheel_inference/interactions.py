"""Every answer is logged to Kafka after it is sent, through a bounded buffer that survives outages."""

from __future__ import annotations

from flywheel_common.kafka import BufferedEventProducer
from flywheel_inference.metrics import INTERACTIONS_BUFFERED, INTERACTIONS_DROPPED
from flywheel_inference.settings import InferenceSettings
from flywheel_proto.flywheel.events.v1 import events_pb2


class KafkaInteractionSink:
    """Publishes Interaction events keyed by query id; never blocks or fails an answer."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.topic = settings.kafka.topics.interactions
        self.producer = BufferedEventProducer(
            settings.kafka,
            name="interactions",
            max_buffered=settings.interaction_buffer,
            buffered_gauge=INTERACTIONS_BUFFERED,
            dropped_counter=INTERACTIONS_DROPPED,
        ).start()

    def publish(self, key: str, event: events_pb2.Interaction) -> None:
        self.producer.emit(self.topic, key, event)

    def close(self) -> None:
        self.producer.close()


def build_sink(settings: InferenceSettings) -> KafkaInteractionSink:
    return KafkaInteractionSink(settings)
