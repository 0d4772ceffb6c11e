"""The evaluator's parts wired once: Kafka consumers, the gatekeeper, the gRPC server and their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.dev_secrets import DEV_PSEUDONYM_KEY
from flywheel_common.grpc_server import GrpcServer
from flywheel_common.kafka import EventProducer, ensure_topics
from flywheel_common.registry import ModelRegistry
from flywheel_common.runtime import ConsumerThread, connect_with_retry
from flywheel_common.secrets import read_secret
from flywheel_evaluator.consumers import CandidateConsumer, SignalConsumer
from flywheel_evaluator.evaluation import GoldenSet, load_golden
from flywheel_evaluator.gatekeeper import Gatekeeper
from flywheel_evaluator.live import LiveStore
from flywheel_evaluator.service import EvaluatorServicer
from flywheel_evaluator.settings import EvaluatorSettings
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2_grpc
from flywheel_proto.flywheel.events.v1 import events_pb2

log = logging.getLogger("flywheel_evaluator")

# A consumer that failed waits this long before it rejoins (a gate may be what failed).
_RESTART_AFTER_S = 5.0


class EvaluatorApp:
    """The service's parts, wired once; `start` and `stop` are used by main() and by tests."""

    def __init__(self, settings: EvaluatorSettings, *, golden: GoldenSet | None = None) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.artifact_root)
        self.golden = golden or load_golden(settings.golden, register_in=settings.artifact_root)
        self.store = LiveStore(settings.state_dir / "live.sqlite")
        self.producer = EventProducer(settings.kafka, linger_ms=0, max_block_ms=5000)
        self.gatekeeper = Gatekeeper(settings, self.registry, self.golden, self.store, self._emit)
        self.candidates = CandidateConsumer(
            settings, self.gatekeeper.process_candidate, self.gatekeeper.stopping
        )
        self.signals = SignalConsumer(settings, self.store)
        self._consuming = [
            ConsumerThread(consumer, restart_after_s=_RESTART_AFTER_S)
            for consumer in (self.candidates, self.signals)
        ]
        pseudonym_key = read_secret(
            settings.pseudonym_key_file, name="pseudonym key", dev_default=DEV_PSEUDONYM_KEY
        )
        servicer = EvaluatorServicer(
            self.gatekeeper, Authenticator(load_tokens(settings.auth.tokens_file)), pseudonym_key
        )
        self.server = GrpcServer(settings.grpc, "evaluator")
        self.server.add_service(
            "flywheel.evaluator.v1.EvaluatorService",
            lambda s: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(servicer, s),
        )
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _emit(self, event: events_pb2.GateDecision) -> None:
        """Sends a decision on Kafka; raises when the broker does not acknowledge it."""
        topic = self.settings.kafka.topics.decisions
        future = self.producer.send(topic, event.version or event.decision_id, event)
        future.get(timeout=self.settings.kafka.request_timeout_ms / 1000 + 5)

    async def start(self) -> int:
        """Starts serving; health turns SERVING once Kafka is reachable and the candidates are assigned."""
        port = await self.server.start()
        self._tasks.append(asyncio.create_task(self._connect()))
        return port

    def _connect_kafka(self) -> None:
        if self.settings.create_topics:
            ensure_topics(self.settings.kafka)
        self.producer.connect([self.settings.kafka.topics.decisions])

    async def _connect(self) -> None:
        await connect_with_retry(self._connect_kafka)
        loop = asyncio.get_running_loop()
        assigned = asyncio.Event()
        self.candidates.on_assigned = lambda: loop.call_soon_threadsafe(assigned.set)
        for thread in self._consuming:
            thread.start()
        self._tasks.append(asyncio.create_task(self._monitor()))
        await assigned.wait()
        await self.server.set_serving(True)
        self.ready.set()
        log.info(
            "evaluator ready: golden set %s (%d questions), candidates from %s",
            self.golden.name,
            len(self.golden.items),
            self.settings.kafka.topics.candidates,
        )

    async def _monitor(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.gatekeeper.tick)
            except Exception:
                log.exception("canary check failed")
            await asyncio.sleep(self.settings.canary.check_interval_s)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, calls drain, consumers stop (an evaluation in progress is abandoned)."""
        await self.server.stop(grace)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for thread in self._consuming:  # all asked first: they stop side by side
            thread.consumer.signal_shutdown()
        for thread in self._consuming:
            await thread.stop()
        await asyncio.to_thread(self.gatekeeper.stop, 60)
        await asyncio.to_thread(self.producer.close)
        self.store.close()
