"""Entry point: `python -m flywheel_evaluator` gates candidates, runs canaries, promotes and rolls back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.grpc_server import GrpcServer, wait_for_shutdown_signal
from flywheel_common.kafka import EventConsumer, EventProducer, ensure_topics
from flywheel_common.logging import configure_logging
from flywheel_common.metrics import start_metrics_server
from flywheel_common.registry import ModelRegistry
from flywheel_common.tracing import configure_tracing
from flywheel_evaluator.consumers import CandidateConsumer, SignalConsumer
from flywheel_evaluator.evaluation import EvaluationCancelled, GoldenSet, load_golden
from flywheel_evaluator.gatekeeper import Gatekeeper
from flywheel_evaluator.live import LiveStore
from flywheel_evaluator.service import EvaluatorServicer
from flywheel_evaluator.settings import EvaluatorSettings
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2_grpc
from flywheel_proto.flywheel.events.v1 import events_pb2

log = logging.getLogger("flywheel_evaluator")

_RETRY_S = 1.0


class EvaluatorApp:
    """The service's parts, wired once; `start` and `stop` are used by main() and by tests."""

    def __init__(self, settings: EvaluatorSettings, *, golden: GoldenSet | None = None) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.artifact_root)
        self.golden = golden or load_golden(settings.golden, register_in=settings.artifact_root)
        self.store = LiveStore(settings.state_dir / "live.sqlite")
        self.producer = EventProducer(settings.kafka, linger_ms=0, max_block_ms=5000)
        self.gatekeeper = Gatekeeper(settings, self.registry, self.golden, self.store, self._emit)
        self._stopping = self.gatekeeper.stopping
        self.candidates = CandidateConsumer(settings, self.gatekeeper.process_candidate, self._stopping)
        self.signals = SignalConsumer(settings, self.store)
        self.servicer = EvaluatorServicer(
            self.gatekeeper, Authenticator(load_tokens(settings.auth.tokens_file))
        )
        self.server = GrpcServer(settings.grpc, "evaluator")
        self.server.add_service(
            "flywheel.evaluator.v1.EvaluatorService",
            lambda s: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(self.servicer, s),
        )
        self.ready = asyncio.Event()
        self._threads: list[threading.Thread] = []
        self._tasks: list[asyncio.Task[None]] = []

    def _emit(self, event: events_pb2.GateDecision) -> None:
        """Sends a decision on Kafka; raises when the broker does not acknowledge it."""
        topic = self.settings.kafka.topics.decisions
        future = self.producer.send(topic, event.version or event.decision_id, event)
        future.get(timeout=self.settings.kafka.request_timeout_ms / 1000 + 5)

    async def _monitor(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.gatekeeper.tick)
            except Exception:
                log.exception("canary check failed")
            await asyncio.sleep(self.settings.canary.check_interval_s)

    # Lifecycle

    def _run_consumer(self, consumer: EventConsumer) -> None:
        """Runs a consumer until shutdown, restarting it after an unexpected error."""
        while not self._stopping.is_set():
            try:
                consumer.run()
                return
            except EvaluationCancelled:
                return
            except Exception:
                log.exception("%s failed; restarting it in %.0f s", type(consumer).__name__, _RETRY_S * 5)
                self._stopping.wait(_RETRY_S * 5)

    async def start(self) -> int:
        """Starts serving; health turns SERVING once Kafka is reachable and the candidates are assigned."""
        port = await self.server.start()
        self._tasks.append(asyncio.create_task(self._connect()))
        return port

    async def _connect(self) -> None:
        kafka = self.settings.kafka
        warned = False
        while True:
            try:
                if self.settings.create_topics:
                    await asyncio.to_thread(ensure_topics, kafka)
                await asyncio.to_thread(self.producer.connect, [kafka.topics.decisions])
                break
            except Exception as exc:  # KafkaError or a missing topic: keep trying, say so once
                if not warned:
                    log.warning("Kafka not reachable yet (%s); retrying", type(exc).__name__)
                    warned = True
                await asyncio.sleep(_RETRY_S)
        loop = asyncio.get_running_loop()
        assigned = asyncio.Event()

        def on_ready() -> None:
            loop.call_soon_threadsafe(assigned.set)

        self.candidates.on_ready = on_ready
        for consumer in (self.candidates, self.signals):
            thread = threading.Thread(
                target=self._run_consumer, args=(consumer,), name=type(consumer).__name__, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._tasks.append(asyncio.create_task(self._monitor()))
        await assigned.wait()
        await self.server.set_serving(True)
        self.ready.set()
        log.info(
            "evaluator ready: golden set %s (%d questions), candidates from %s",
            self.golden.name,
            len(self.golden.items),
            kafka.topics.candidates,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, calls drain, consumers stop (an evaluation in progress is abandoned)."""
        await self.server.stop(grace)
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.candidates.signal_shutdown()
        self.signals.signal_shutdown()
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 60)
        await asyncio.to_thread(self.gatekeeper.stop, 60)
        await asyncio.to_thread(self.producer.close)
        self.store.close()


async def serve(settings: EvaluatorSettings) -> None:
    app = EvaluatorApp(settings)
    await app.start()
    await wait_for_shutdown_signal()
    await app.stop()


def main() -> None:
    settings = EvaluatorSettings()
    configure_logging(settings.logging, "evaluator")
    configure_tracing(settings.tracing, "evaluator")
    start_metrics_server(settings.metrics)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
