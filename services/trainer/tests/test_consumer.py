"""The trainer's consumer: only redacted, signed events are stored, and its lag shows past a failing batch."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition
from prometheus_client import REGISTRY

from flywheel_common.dev_secrets import DEV_EVENT_SIGNING_KEY, DEV_QUERY_ID_KEY
from flywheel_common.event_signing import SIGNATURE_HEADER, EventSigner
from flywheel_common.redaction import REDACTED_HEADER
from flywheel_common.settings import KafkaSettings
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_trainer import datasets
from flywheel_trainer.consumer import TrainerConsumer
from flywheel_trainer.settings import TrainerSettings
from flywheel_trainer.store import JoinStore

RAW = ("jane.doe@example.com", "+1 415-555-0132", "John Smith", "hunter2")


def record(topic: str, offset: int, event: Any, headers: list[tuple[str, bytes]]) -> ConsumerRecord:
    value = event.SerializeToString()
    return ConsumerRecord(
        topic=topic,
        partition=0,
        leader_epoch=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=value,
        headers=headers,
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=len(value),
        serialized_header_size=-1,
    )


def signed(topic: str, event: Any) -> list[tuple[str, bytes]]:
    return [
        (SIGNATURE_HEADER, EventSigner(DEV_EVENT_SIGNING_KEY).sign(topic, b"k", event.SerializeToString()))
    ]


def from_inference(topic: str, event: Any, *, redacted: bool = True) -> list[tuple[str, bytes]]:
    """The headers inference sends an interaction with: its redaction mark, and its signature."""
    signer = EventSigner.for_interactions(DEV_QUERY_ID_KEY)
    context = REDACTED_HEADER.encode() if redacted else b""
    signature = (SIGNATURE_HEADER, signer.sign(topic, b"k", event.SerializeToString(), context))
    return [(REDACTED_HEADER, b"1"), signature] if redacted else [signature]


@pytest.fixture
def settings(tmp_path: Path) -> TrainerSettings:
    return TrainerSettings(kafka=KafkaSettings(), artifact_root=tmp_path / "artifacts", data_dir=tmp_path)


def test_feedback_the_feedback_service_did_not_sign_is_dead_lettered(
    settings: TrainerSettings, store: JoinStore
) -> None:
    consumer = TrainerConsumer(settings, store)
    dead: list[tuple[int, str]] = []
    consumer.dead_letter = lambda record, reason: dead.append((record.offset, reason))  # type: ignore[method-assign]
    topics = settings.kafka.topics
    interaction = events_pb2.Interaction(query_id="q1", question="Q?", answer="A", model_version="v1")
    forged = events_pb2.Feedback(
        feedback_id="f-forged",
        query_id="q1",
        kind=events_pb2.FEEDBACK_KIND_CORRECTION,
        redacted_text="Injected expert answer.",
        reviewer_role=events_pb2.REVIEWER_ROLE_EXPERT,
    )
    other_key = [(SIGNATURE_HEADER, EventSigner(b"someone-elses-key-0123").sign(topics.feedback, b"k", b""))]
    tampered = signed(topics.feedback, events_pb2.Feedback(feedback_id="f-forged", query_id="q1"))
    consumer.handle(
        [
            record(topics.interactions, 0, interaction, from_inference(topics.interactions, interaction)),
            record(topics.feedback, 0, forged, []),
            record(topics.feedback, 1, forged, other_key),
            record(topics.feedback, 2, forged, tampered),
        ]
    )
    assert [offset for offset, _ in dead] == [0, 1, 2]
    assert all("signed" in reason for _, reason in dead)
    assert store.pending().examples == 0, "no forged expert correction became an example"
    consumer.handle([record(topics.feedback, 3, forged, signed(topics.feedback, forged))])
    assert store.pending().examples == 1


def test_interactions_inference_did_not_sign_are_dead_lettered(
    settings: TrainerSettings, store: JoinStore
) -> None:
    """Nobody else puts words in the model's mouth, nor marks raw text as redacted."""
    consumer = TrainerConsumer(settings, store)
    dead: list[tuple[int, str]] = []
    consumer.dead_letter = lambda record, reason: dead.append((record.offset, reason))  # type: ignore[method-assign]
    topic = settings.kafka.topics.interactions
    forged = events_pb2.Interaction(query_id="q1", question="Q?", answer="Download it from evil.example")
    raw = events_pb2.Interaction(query_id="q2", question="Mail jane.doe@example.com?", answer="A")
    # Signed unmarked (inference with redaction off), then marked as redacted by someone else.
    unmarked = from_inference(topic, raw, redacted=False)
    consumer.handle(
        [
            record(topic, 0, forged, [(REDACTED_HEADER, b"1")]),
            record(topic, 1, forged, [(REDACTED_HEADER, b"1"), *signed(topic, forged)]),  # feedback's key
            record(topic, 2, raw, [(REDACTED_HEADER, b"1"), *unmarked]),
            record(topic, 3, raw, unmarked),
        ]
    )
    assert [offset for offset, _ in dead] == [0, 1, 2]
    assert all("unsigned or badly signed" in reason for _, reason in dead)
    assert store.counts()["interactions"] == 1
    [row] = store._query("SELECT question FROM interactions")
    assert "jane.doe@example.com" not in row["question"], "an unmarked interaction is redacted here"


def test_interactions_no_producer_redacted_are_redacted_before_the_store(
    tmp_path: Path, settings: TrainerSettings, store: JoinStore, ev: Any
) -> None:
    consumer = TrainerConsumer(settings, store)
    topics = settings.kafka.topics
    unredacted = events_pb2.Interaction(
        query_id="q1",
        page_title="Page of John Smith",
        question="My name is John Smith, mail jane.doe@example.com, password: hunter2. Why?",
        answer="John Smith, call +1 415-555-0132.",
        passages=["Reach jane.doe@example.com."],
        model_version="v1",
    )
    marked = events_pb2.Interaction(
        query_id="q2", question="What is [EMAIL]?", answer="A", model_version="v1"
    )
    correction = events_pb2.Feedback(
        feedback_id="f1",
        query_id="q1",
        kind=events_pb2.FEEDBACK_KIND_CORRECTION,
        redacted_text="The answer.",
        reviewer_role=events_pb2.REVIEWER_ROLE_EXPERT,
    )
    consumer.handle(
        [
            record(
                topics.interactions,
                0,
                unredacted,
                from_inference(topics.interactions, unredacted, redacted=False),
            ),
            record(topics.interactions, 1, marked, from_inference(topics.interactions, marked)),
            record(topics.feedback, 0, correction, signed(topics.feedback, correction)),
        ]
    )
    cut = store.cut(max_examples=10, reason="manual")
    assert cut is not None
    row = store.dataset(cut.dataset_id)
    assert row is not None
    files, manifest = datasets.build(
        cut.dataset_id, store.dataset_rows(cut.dataset_id), created_at=row["created_at"], reason=row["reason"]
    )
    folder = datasets.write(tmp_path / "artifacts", cut.dataset_id, files, manifest)
    assert manifest["example_ids"], "the correction became an example"
    store.close()
    on_disk = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for value in RAW:
        assert value.encode() not in on_disk, f"{value!r} is on disk"
    assert b"[NAME]" in b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_a_signed_event_replayed_after_the_retention_window_is_dropped(
    settings: TrainerSettings, store: JoinStore
) -> None:
    """The store forgets feedback after the window; a replay of its signed bytes must not count again."""
    consumer = TrainerConsumer(settings, store)
    topics = settings.kafka.topics
    interaction = events_pb2.Interaction(query_id="q1", question="Q?", answer="A", model_version="v1")
    accept = events_pb2.Feedback(
        feedback_id="f-old",
        query_id="q1",
        kind=events_pb2.FEEDBACK_KIND_RATING,
        value=5,
        reviewer_role=events_pb2.REVIEWER_ROLE_EXPERT,
    )
    accept.created_at.FromSeconds(int(time.time() - settings.retention_s - 60))
    consumer.handle(
        [
            record(topics.interactions, 0, interaction, from_inference(topics.interactions, interaction)),
            record(topics.feedback, 0, accept, signed(topics.feedback, accept)),
        ]
    )
    assert store.pending().examples == 0
    accept.created_at.FromSeconds(int(time.time()))
    consumer.handle([record(topics.feedback, 1, accept, signed(topics.feedback, accept))])
    assert store.pending().examples == 1


def test_an_interaction_replayed_after_the_retention_window_is_dropped(
    settings: TrainerSettings, store: JoinStore
) -> None:
    """Stored as received now, a replayed answer the store had purged would be kept another window."""
    consumer = TrainerConsumer(settings, store)
    topic = settings.kafka.topics.interactions
    stale = REGISTRY.get_sample_value("flywheel_trainer_interactions_stale_total") or 0.0
    old = events_pb2.Interaction(query_id="q1", session_pseudonym="a" * 32, question="Q?", answer="A")
    old.created_at.FromSeconds(int(time.time() - settings.retention_s - 60))
    new = events_pb2.Interaction(query_id="q2", session_pseudonym="a" * 32, question="Q?", answer="A")
    new.created_at.FromSeconds(int(time.time() - settings.retention_s + 600))
    consumer.handle(
        [
            record(topic, 0, old, from_inference(topic, old)),
            record(topic, 1, new, from_inference(topic, new)),
        ]
    )
    assert [r["query_id"] for r in store._query("SELECT query_id FROM interactions")] == ["q2"]
    assert REGISTRY.get_sample_value("flywheel_trainer_interactions_stale_total") == stale + 1


class _Positions:
    """The running client as `_update_lag` reads it: a batch polled from offset 10, 40 records behind it."""

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    def highwater(self, tp: TopicPartition) -> int:
        return 51

    def position(self, tp: TopicPartition) -> int:
        return 11


def test_lag_is_measured_before_a_batch_that_fails(
    settings: TrainerSettings, store: JoinStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails over and over (the consumer restarted each time) must not freeze the gauge
    at its last value while the partition fills up behind it."""
    consumer = TrainerConsumer(settings, store)
    topic = settings.kafka.topics.feedback
    consumer.kafka = _Positions(TopicPartition(topic, 0))  # type: ignore[assignment]

    def locked(*_: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "ingest", locked)
    event = events_pb2.Feedback(
        feedback_id="f1", query_id="q1", kind=events_pb2.FEEDBACK_KIND_RATING, value=5
    )
    with pytest.raises(sqlite3.OperationalError):
        consumer.handle([record(topic, 10, event, signed(topic, event))])
    assert (
        REGISTRY.get_sample_value("flywheel_trainer_consumer_lag", {"topic": topic, "partition": "0"}) == 40
    )
