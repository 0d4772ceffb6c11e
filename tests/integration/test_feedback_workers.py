"""Feedback workers on one port: all serve, SIGTERM loses no acknowledged feedback, retries dedupe."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client.multiprocess import MultiProcessCollector

from flywheel_cli.local.kafka_broker import free_port
from flywheel_common.dev_secrets import DEV_QUERY_ID_KEY
from flywheel_common.kafka import decode
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.settings import KafkaSettings
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from flywheel_trainer.policy import ExamplePolicy
from flywheel_trainer.settings import PolicySettings
from flywheel_trainer.store import JoinStore, signal_of

pytestmark = pytest.mark.integration

USER = (("authorization", "Bearer dev-user-token"),)
WORKERS = 2
# Connections the calls spread over: SO_REUSEPORT hands each to a worker by its address hash, so
# with 16 all land on one of two workers once in 30,000 runs.
CONNECTIONS = 16


@dataclass
class Supervised:
    """A `python -m flywheel_feedback` supervisor with its workers, and connections to its port."""

    process: asyncio.subprocess.Process
    port: int
    metrics_port: int
    metrics_dir: Path
    stubs: list[feedback_pb2_grpc.FeedbackServiceStub]

    def worker_pids(self) -> list[int]:
        """The supervisor's live child processes."""
        pid = self.process.pid
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def accepted_by(self, pid: int) -> float:
        """Feedback one worker accepted, from its own multiprocess metrics file."""
        metrics = MultiProcessCollector.merge([str(self.metrics_dir / f"counter_{pid}.db")])
        return sum(s.value for m in metrics if m.name == "flywheel_feedback_accepted" for s in m.samples)

    def scraped(self, name: str) -> float:
        """A sample summed over its labels, from the supervisor's /metrics endpoint."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.fixture
def signer() -> QueryIdSigner:
    return QueryIdSigner(DEV_QUERY_ID_KEY)


async def _read_port(process: asyncio.subprocess.Process, lines: list[str]) -> int:
    """The port from the supervisor's "N workers on port P" log line (it binds port 0 itself)."""
    assert process.stdout is not None
    while line := (await process.stdout.readline()).decode():
        lines.append(line)
        entry = json.loads(line) if line.startswith("{") else {}
        if "port" in entry:
            return int(entry["port"])
    raise AssertionError("the supervisor exited before it logged its port:\n" + "".join(lines))


async def _drain(process: asyncio.subprocess.Process, lines: list[str], ready: asyncio.Event) -> None:
    """Reads the rest of the log (so that no process blocks on a full pipe); `ready` is set once
    every worker logged that it is ready."""
    assert process.stdout is not None
    workers_ready = 0
    while line := (await process.stdout.readline()).decode():
        lines.append(line)
        workers_ready += "feedback ready" in line
        if workers_ready >= WORKERS:
            ready.set()


async def _serving(channel: grpc.aio.Channel, timeout_s: float) -> None:
    """Waits until the worker behind `channel` is SERVING (its producer holds the topic)."""
    health = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)


@pytest.fixture
async def supervised(kafka_settings: KafkaSettings, tmp_path: Path) -> AsyncIterator[Supervised]:
    metrics_port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {
        **os.environ,
        "FLYWHEEL_FEEDBACK_WORKERS": str(WORKERS),
        "FLYWHEEL_FEEDBACK_GRPC__PORT": "0",
        "FLYWHEEL_FEEDBACK_GRPC__GRACE_S": "10",
        "FLYWHEEL_FEEDBACK_METRICS__PORT": str(metrics_port),
        "FLYWHEEL_FEEDBACK_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "FLYWHEEL_FEEDBACK_KAFKA__TOPICS__FEEDBACK": kafka_settings.topics.feedback,
        "FLYWHEEL_FEEDBACK_RATE_LIMIT__PER_SECOND": "0",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "flywheel_feedback",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[str] = []
    channels: list[grpc.aio.Channel] = []
    drain: asyncio.Task[None] | None = None
    try:
        port = await asyncio.wait_for(_read_port(process, lines), 120)
        ready = asyncio.Event()
        drain = asyncio.create_task(_drain(process, lines, ready))
        # Every worker listening first: a connection opened before one listens goes to the others.
        await asyncio.wait_for(ready.wait(), 120)
        # A pool of its own per channel: one connection each, spread over the workers.
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CONNECTIONS)
        ]
        for channel in channels:
            await _serving(channel, 120)
        stubs = [feedback_pb2_grpc.FeedbackServiceStub(c) for c in channels]
        yield Supervised(process, port, metrics_port, metrics_dir, stubs)
    finally:
        for channel in channels:
            await channel.close()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 120)
        if drain is not None:
            await drain


async def _submit(
    stub: feedback_pb2_grpc.FeedbackServiceStub, request: feedback_pb2.SubmitFeedbackRequest
) -> feedback_pb2.SubmitFeedbackResponse:
    return await stub.SubmitFeedback(request, metadata=USER, timeout=60)


async def test_every_worker_serves_and_sigterm_loses_no_acknowledged_feedback(
    supervised: Supervised,
    kafka_settings: KafkaSettings,
    signer: QueryIdSigner,
    read_topic: Callable[..., list[ConsumerRecord]],
) -> None:
    query_id = signer.issue("base-v1")
    first = [
        await _submit(stub, feedback_pb2.SubmitFeedbackRequest(query_id=query_id, rating=1 + i % 5))
        for i, stub in enumerate(supervised.stubs)
    ]
    pids = supervised.worker_pids()
    assert len(pids) == WORKERS
    # Each worker took some of the connections, and the supervisor's /metrics adds them up.
    per_worker = [supervised.accepted_by(pid) for pid in pids]
    assert all(n > 0 for n in per_worker), per_worker
    assert sum(per_worker) == len(first)
    assert supervised.scraped("flywheel_feedback_accepted_total") == len(first)

    # A burst on every connection; SIGTERM once some of it is acknowledged.
    acknowledged: list[str] = [r.feedback_id for r in first]
    refused: list[grpc.StatusCode] = []
    some_acked = asyncio.Event()

    async def client(stub: feedback_pb2_grpc.FeedbackServiceStub, c: int) -> None:
        for n in range(40):
            request = feedback_pb2.SubmitFeedbackRequest(query_id=query_id, thumbs_up=n % 2 == 0)
            try:
                response = await stub.SubmitFeedback(request, metadata=USER, timeout=60)
            except grpc.aio.AioRpcError as exc:
                refused.append(exc.code())
                return
            acknowledged.append(response.feedback_id)
            if len(acknowledged) >= len(first) + 64:
                some_acked.set()

    burst = asyncio.gather(*(client(stub, c) for c, stub in enumerate(supervised.stubs)))
    await asyncio.wait_for(some_acked.wait(), 120)
    supervised.process.send_signal(signal.SIGTERM)
    await burst
    assert await asyncio.wait_for(supervised.process.wait(), 120) == 0

    # Every call answered OK is on the topic; the rest were refused with a retryable status.
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    records = read_topic(kafka_settings.topics.feedback, len(acknowledged), timeout_s=60)
    stored = {decode(r, events_pb2.Feedback).feedback_id for r in records}
    assert set(acknowledged) <= stored


async def test_a_retry_on_another_worker_keeps_its_feedback_id_and_the_trainer_drops_it(
    supervised: Supervised,
    kafka_settings: KafkaSettings,
    signer: QueryIdSigner,
    read_topic: Callable[..., list[ConsumerRecord]],
    tmp_path: Path,
) -> None:
    request = feedback_pb2.SubmitFeedbackRequest(
        query_id=signer.issue("base-v1"), rating=2, idempotency_key="k-1"
    )
    # The same retry on every connection, one after the other: each worker stores it once (its
    # cache answers duplicate afterwards), all with one feedback id.
    responses = [await _submit(stub, request) for stub in supervised.stubs]
    assert len({r.feedback_id for r in responses}) == 1
    assert sum(not r.duplicate for r in responses) == WORKERS

    records = read_topic(kafka_settings.topics.feedback, WORKERS)
    events = [decode(r, events_pb2.Feedback) for r in records]
    assert len(events) == WORKERS
    assert {e.feedback_id for e in events} == {responses[0].feedback_id}
    # The trainer keeps one of them.
    store = JoinStore(tmp_path / "trainer.sqlite3", ExamplePolicy(PolicySettings()))
    try:
        result = store.ingest([], [signal_of(e) for e in events])
        assert result.duplicates == WORKERS - 1
        assert store.counts()["feedback"] == 1
    finally:
        store.close()


async def test_a_worker_that_dies_stops_the_service(supervised: Supervised) -> None:
    first, second = supervised.worker_pids()
    os.kill(first, signal.SIGKILL)
    # Not half a service that still answers some probes: the other drains, the supervisor fails.
    assert await asyncio.wait_for(supervised.process.wait(), 120) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)
