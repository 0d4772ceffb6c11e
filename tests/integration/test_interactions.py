"""Inference logs every answer to Kafka, and keeps answering while the broker is down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from flywheel_cli.local.kafka_broker import LocalBroker
from flywheel_common.dev_secrets import DEV_PSEUDONYM_KEY, DEV_QUERY_ID_KEY
from flywheel_common.event_signing import EventSigner
from flywheel_common.kafka import decode, header
from flywheel_common.pseudonym import pseudonymise
from flywheel_common.query_ids import query_id_network
from flywheel_common.redaction import REDACTED_HEADER
from flywheel_common.registry import ModelRegistry
from flywheel_common.settings import KafkaSettings
from flywheel_inference.app import InferenceApp
from flywheel_inference.settings import InferenceSettings
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

PAGE = inference_pb2.Page(
    url="https://example.org/kafka",
    title="About Kafka",
    text="Apache Kafka is a distributed event store. It was originally developed at LinkedIn.",
)


def ask(question: str) -> inference_pb2.AnswerRequest:
    return inference_pb2.AnswerRequest(
        page=PAGE,
        question=question,
        session_id="visitor-7",
        options=inference_pb2.GenerationOptions(max_new_tokens=8),
    )


@pytest.fixture(scope="module")
def artifact_root(tmp_path_factory: pytest.TempPathFactory, onnx_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    registry = ModelRegistry(root)
    registry.set_production(registry.register(onnx_model_dir, kind="base").version)
    return root


@pytest.fixture
async def inference(
    artifact_root: Path, kafka_settings: KafkaSettings
) -> AsyncIterator[tuple[InferenceApp, inference_pb2_grpc.InferenceServiceStub]]:
    settings = InferenceSettings(
        grpc={"port": 0}, metrics={"port": 0}, artifact_root=artifact_root, kafka=kafka_settings
    )
    app = InferenceApp(settings)
    port = await app.start()
    for _ in range(600):
        if app.router.ready:
            break
        await asyncio.sleep(0.1)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield app, inference_pb2_grpc.InferenceServiceStub(channel)
    await channel.close()
    await app.stop(grace=5)


async def test_answers_are_on_the_topic_and_survive_a_broker_outage(
    inference: tuple[InferenceApp, inference_pb2_grpc.InferenceServiceStub],
    kafka_broker: LocalBroker,
    kafka_settings: KafkaSettings,
    read_topic: Callable[..., list[ConsumerRecord]],
) -> None:
    app, stub = inference
    topic = kafka_settings.topics.interactions
    # As the gateway asks: naming its visitor's network, with its token.
    request = ask("Where was Kafka developed?")
    request.client_network = "203.0.113.0/24"
    first = await stub.Answer(request, metadata=(("authorization", "Bearer dev-user-token"),), timeout=120)
    [record] = read_topic(topic, 1)
    event = decode(record, events_pb2.Interaction)
    assert record.key == first.query_id.encode()
    assert (event.query_id, event.answer, event.model_version) == (first.query_id, first.answer, "v1")
    assert event.question == "Where was Kafka developed?"
    assert event.session_pseudonym == pseudonymise(DEV_PSEUDONYM_KEY, "visitor-7", domain="session")
    # The client's network travels only as a pseudonym inside the signed query id.
    network = pseudonymise(DEV_PSEUDONYM_KEY, "203.0.113.0/24", domain="network")
    assert query_id_network(event.query_id) == network
    assert b"visitor-7" not in record.value and b"203.0.113" not in record.value
    assert event.passages and event.page_content_hash

    kafka_broker.stop(kill=True)
    try:
        # Answers keep coming while Kafka is away; their interactions wait in the buffer.
        during = [await stub.Answer(ask(f"Question {i}?"), timeout=120) for i in range(3)]
        assert all(r.answer for r in during)
        assert app.sink is not None
        # Redacted (on the sink's thread), then held in the producer's buffer.
        await asyncio.to_thread(app.sink.flush, 1.0)
        assert app.sink.producer.buffered == 3
    finally:
        kafka_broker.start()
    assert await asyncio.to_thread(app.sink.producer.flush, 60)
    records = read_topic(topic, 4)
    assert {decode(r, events_pb2.Interaction).query_id for r in records} == {
        first.query_id,
        *(r.query_id for r in during),
    }
    assert app.sink.producer.stats.dropped == 0


async def test_interactions_reach_kafka_redacted(
    inference: tuple[InferenceApp, inference_pb2_grpc.InferenceServiceStub],
    kafka_settings: KafkaSettings,
    read_topic: Callable[..., list[ConsumerRecord]],
) -> None:
    app, stub = inference
    page = inference_pb2.Page(
        url="https://user:hunter2@example.org/account/jane.doe@example.com?token=s3cr3t-t0ken#session=abc",
        title="Profile of Dr. Alice Liddell",
        text="Contact Alice Liddell at alice.liddell@example.org or +44 20 7946 0958. She lives at 12 Oak "
        "Lane, Oxford OX1 2JD.",
    )
    question = (
        "My name is John Smith, email john.smith@example.com, phone +1 415-555-0132: what is her email?"
    )
    request = inference_pb2.AnswerRequest(
        page=page,
        question=question,
        session_id="visitor-8",
        options=inference_pb2.GenerationOptions(max_new_tokens=24),
    )
    response = await stub.Answer(request, timeout=120)
    assert app.sink is not None and await asyncio.to_thread(app.sink.flush, 30)
    [record] = read_topic(kafka_settings.topics.interactions, 1)
    raw = record.value.decode(errors="replace")
    for value in (
        "hunter2",
        "s3cr3t-t0ken",
        "session=abc",
        "jane.doe@example.com",
        "John Smith",
        "john.smith@example.com",
        "415-555-0132",
        "alice.liddell@example.org",
        "7946 0958",
        "12 Oak Lane",
        "OX1 2JD",
        "Liddell",
    ):
        assert value not in raw, f"{value!r} reached Kafka"
    # Signed, with its redaction mark: what the trainer and the evaluator accept (and nothing else).
    assert EventSigner.for_interactions(DEV_QUERY_ID_KEY).signed(record, mark=REDACTED_HEADER)
    assert not EventSigner.for_interactions(DEV_QUERY_ID_KEY).signed(record)
    event = decode(record, events_pb2.Interaction)
    assert event.page_url == "https://example.org/account/[EMAIL]"
    assert event.question.startswith("My name is [NAME], email [EMAIL], phone [PHONE]")
    assert event.page_title == "Profile of Dr. [NAME]"
    assert header(record, REDACTED_HEADER) == b"1"
    assert event.query_id == response.query_id
