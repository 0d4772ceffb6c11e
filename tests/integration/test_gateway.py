"""The review console's actions through the gateway reach Kafka as the expert's own feedback.

The real feedback service on the session broker, the real trainer service (its review queue, which
also checks the expert's login) on a store of its own, and the gateway's application in front.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.dev_secrets import DEV_QUERY_ID_KEY
from flywheel_common.grpc_server import GrpcServer
from flywheel_common.kafka import decode
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.redaction import Redactor
from flywheel_common.registry import ModelRegistry
from flywheel_common.settings import GrpcSettings, KafkaSettings, MetricsSettings
from flywheel_feedback.app import FeedbackApp
from flywheel_feedback.settings import FeedbackSettings
from flywheel_gateway.api import Gateway
from flywheel_gateway.clients import ServiceClients
from flywheel_gateway.settings import GatewaySettings
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2_grpc
from flywheel_trainer.launchers import JobLauncher
from flywheel_trainer.policy import ExamplePolicy
from flywheel_trainer.service import TrainerServicer
from flywheel_trainer.settings import PolicySettings, TrainerSettings
from flywheel_trainer.store import JoinStore
from flywheel_trainer.trainer import Trainer

pytestmark = pytest.mark.integration

GATEWAY = "https://gateway.example.test"


@pytest.fixture
async def console(
    kafka_settings: KafkaSettings, tmp_path: Path, idle_launcher: JobLauncher
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the gateway, logged in to the console as the development expert."""
    feedback = FeedbackApp(
        FeedbackSettings(
            grpc=GrpcSettings(port=0, grace_s=1), metrics=MetricsSettings(port=0), kafka=kafka_settings
        ),
        redactor=Redactor(presidio=False),
    )
    feedback_port = await feedback.start()
    await asyncio.wait_for(feedback.ready.wait(), 30)
    store = JoinStore(tmp_path / "trainer.sqlite3", ExamplePolicy(PolicySettings()))
    registry = ModelRegistry(tmp_path / "artifacts")
    trainer = Trainer(
        TrainerSettings(artifact_root=registry.root, data_dir=tmp_path / "trainer"),
        store,
        idle_launcher,
        registry,
        None,
    )
    trainer_server = GrpcServer(GrpcSettings(port=0), "trainer")
    servicer = TrainerServicer(trainer, Authenticator(load_tokens(None)), b"test-pseudonym-key")
    trainer_server.add_service(
        "flywheel.trainer.v1.TrainerService",
        lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s),
    )
    trainer_port = await trainer_server.start()
    settings = GatewaySettings(
        services={"feedback": f"127.0.0.1:{feedback_port}", "trainer": f"127.0.0.1:{trainer_port}"}
    )
    clients = ServiceClients(settings.services)
    gateway = Gateway(settings, clients, session_key=b"k" * 32, visitor_token="dev-user-token")
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.asgi()), base_url=GATEWAY)
    login = await client.post(
        "/console/login", json={"token": "dev-expert-token"}, headers={"origin": GATEWAY}
    )
    assert login.status_code == 204, login.text
    yield client
    await client.aclose()
    await clients.close()
    await trainer_server.stop(0)
    store.close()
    await feedback.stop(1)


async def test_accept_correct_and_unanswerable_are_the_experts_feedback(
    console: httpx.AsyncClient,
    kafka_settings: KafkaSettings,
    read_topic: Callable[..., list[ConsumerRecord]],
) -> None:
    signer = QueryIdSigner(DEV_QUERY_ID_KEY)
    ids = {action: signer.issue("v1") for action in ("accept", "correct", "unanswerable")}
    bodies: list[dict[str, Any]] = [
        {"query_id": ids["accept"], "action": "accept"},
        {"query_id": ids["correct"], "action": "correct", "answer": "Guido van Rossum.", "note": "see §1"},
        {"query_id": ids["unanswerable"], "action": "unanswerable"},
    ]
    for body in bodies:
        reply = await console.post("/api/v1/review/actions", json=body, headers={"origin": GATEWAY})
        assert reply.status_code == 200, reply.text
        assert reply.json()["feedback_id"] and reply.json()["duplicate"] is False
    bad = await console.post(
        "/api/v1/review/actions",
        json={"query_id": ids["accept"], "action": "delete"},
        headers={"origin": GATEWAY},
    )
    assert bad.status_code == 400

    records = read_topic(kafka_settings.topics.feedback, 3)
    events = {e.query_id: e for e in (decode(r, events_pb2.Feedback) for r in records)}
    assert len(events) == 3
    accepted, corrected, unanswerable = (events[ids[a]] for a in ("accept", "correct", "unanswerable"))
    assert (accepted.kind, accepted.value) == (events_pb2.FEEDBACK_KIND_RATING, 5)
    assert (corrected.kind, corrected.redacted_text) == (
        events_pb2.FEEDBACK_KIND_CORRECTION,
        "Guido van Rossum.",
    )
    assert (unanswerable.kind, unanswerable.redacted_text) == (
        events_pb2.FEEDBACK_KIND_CORRECTION,
        "The page does not say.",
    )
    # Every action carries the expert's own role and identity, not the gateway's visitor token's.
    assert {e.reviewer_role for e in events.values()} == {events_pb2.REVIEWER_ROLE_EXPERT}
    assert len({e.submitter_pseudonym for e in events.values()}) == 1
