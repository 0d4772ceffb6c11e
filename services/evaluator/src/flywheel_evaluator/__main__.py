"""Entry point: `python -m flywheel_evaluator` gates candidates, runs canaries, promotes and rolls back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid

from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.errors import NotFound
from flywheel_common.grpc_server import GrpcServer, wait_for_shutdown_signal
from flywheel_common.kafka import EventConsumer, EventProducer, ensure_topics
from flywheel_common.logging import configure_logging
from flywheel_common.metrics import start_metrics_server
from flywheel_common.registry import ModelRegistry
from flywheel_common.tracing import configure_tracing
from flywheel_evaluator.consumers import CandidateConsumer, SignalConsumer
from flywheel_evaluator.evaluation import (
    EvaluationCancelled,
    EvaluationResult,
    Evaluator,
    GoldenSet,
    load_golden,
    read_stored,
)
from flywheel_evaluator.gate import GateVerdict, failed_verdict, judge
from flywheel_evaluator.live import LiveStore
from flywheel_evaluator.metrics import (
    ACCURACY,
    CANARY_FRACTION,
    F1,
    LIVE_FEEDBACK,
    LIVE_IGNORE_RATE,
    LIVE_MEAN_RATING,
    LIVE_THUMBS_DOWN_RATE,
    PRECISION,
    ROLLOUT_STATE,
    rollout_state_value,
)
from flywheel_evaluator.reports import gate_json, gate_markdown
from flywheel_evaluator.rollout import DecisionLog, RolloutController
from flywheel_evaluator.service import GATE_MD, EvaluatorServicer
from flywheel_evaluator.settings import EvaluatorSettings
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2_grpc
from flywheel_proto.flywheel.events.v1 import events_pb2

log = logging.getLogger("flywheel_evaluator")

GATE_JSON = "gate.json"
_RETRY_S = 1.0


class EvaluatorApp:
    """The service's parts, wired once; `start` and `stop` are used by main() and by tests."""

    def __init__(self, settings: EvaluatorSettings, *, golden: GoldenSet | None = None) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.artifact_root)
        self.golden = golden or load_golden(settings.golden, register_in=settings.artifact_root)
        self.evaluator = Evaluator(self.registry, self.golden, settings.evaluation)
        self.store = LiveStore(settings.state_dir / "live.sqlite")
        self.producer = EventProducer(settings.kafka, linger_ms=0, max_block_ms=5000)
        self.decisions = DecisionLog(self.registry, self._emit)
        self.rollout = RolloutController(self.registry, self.store, self.decisions, settings.canary)
        self._stopping = threading.Event()
        self.candidates = CandidateConsumer(settings, self.process_candidate, self._stopping)
        self.signals = SignalConsumer(settings, self.store)
        self.servicer = EvaluatorServicer(self, Authenticator(load_tokens(settings.auth.tokens_file)))
        self.server = GrpcServer(settings.grpc, "evaluator")
        self.server.add_service(
            "flywheel.evaluator.v1.EvaluatorService",
            lambda s: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(self.servicer, s),
        )
        self.ready = asyncio.Event()
        self._threads: list[threading.Thread] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._last_candidate: tuple[str, EvaluationResult] | None = None
        self._prefetch: threading.Thread | None = None

    # Decisions on Kafka

    def _emit(self, event: events_pb2.GateDecision) -> None:
        topic = self.settings.kafka.topics.decisions
        future = self.producer.send(topic, event.version or event.decision_id, event)
        future.get(timeout=self.settings.kafka.request_timeout_ms / 1000 + 5)

    # The gate

    def _evaluate(self, version: str, *, reuse: bool) -> EvaluationResult:
        return self.evaluator.evaluate(version, reuse=reuse, stop=self._stopping)

    def evaluate_now(self, version: str) -> EvaluationResult:
        """Evaluates a version afresh (the Evaluate RPC)."""
        result = self._evaluate(version, reuse=False)
        self.refresh_gauges()
        return result

    def process_candidate(self, candidate: events_pb2.ModelCandidate) -> None:
        """Gates one candidate: evaluates it and production, decides, rolls out, records and emits."""
        version = candidate.version
        existing = self.decisions.gate_decision(version)
        if existing is not None:
            # Decided before a restart or a replay: make sure the event went out, decide nothing new.
            log.info("candidate %s was gated before (decision %s)", version, existing.decision_id)
            self.decisions.emit(existing)
            return
        self.registry.get(version)  # NotFound: the consumer dead-letters the event
        baseline = self.registry.state().production
        if baseline == version:
            log.info("candidate %s is already production; nothing to gate", version)
            return
        log.info("gating candidate %s (parent %s) against %s", version, candidate.parent_version, baseline)
        for _ in range(3):
            verdict, cand, base = self._gate(version, baseline)
            current = self.registry.state().production
            if current in (baseline, version):
                break
            # Production moved while the candidate was evaluated (a canary was promoted, an admin
            # rolled back): judge against what serves now; stored evaluations make this quick.
            log.info("production moved from %s to %s during the gate; judging again", baseline, current)
            baseline = current
        decision_id = uuid.uuid4().hex
        action = self.rollout.after_gate(verdict)
        report = gate_json(
            verdict,
            cand,
            base,
            decision_id=decision_id,
            action=action,
            settings={
                "gate": self.settings.gate.model_dump(),
                "canary": self.settings.canary.model_dump(),
                "parent_version": candidate.parent_version,
                "dataset_id": candidate.dataset_id,
                "job_id": candidate.job_id,
            },
        )
        self.registry.write_report(version, GATE_JSON, json.dumps(report, indent=1))
        self.registry.write_report(version, GATE_MD, gate_markdown(report))
        self.rollout.record_gate(verdict, action, decision_id)
        if cand is not None:
            self._last_candidate = (version, cand)
        self.refresh_gauges()

    def _gate(
        self, version: str, baseline: str | None
    ) -> tuple[GateVerdict, EvaluationResult | None, EvaluationResult | None]:
        """Evaluates the candidate and the baseline and judges; a failed evaluation fails the gate."""
        try:
            cand = self._evaluate(version, reuse=True)
        except EvaluationCancelled:
            raise
        except Exception as exc:
            log.exception("candidate %s could not be evaluated", version)
            return failed_verdict(version, baseline, f"candidate could not be evaluated: {exc}"), None, None
        try:
            base = self._evaluate(baseline, reuse=True) if baseline else None
        except EvaluationCancelled:
            raise
        except Exception as exc:
            log.exception("production %s could not be evaluated", baseline)
            why = f"production {baseline} could not be evaluated: {exc}"
            return failed_verdict(version, baseline, why), cand, None
        e = self.settings.evaluation
        verdict = judge(cand, base, self.settings.gate, resamples=e.bootstrap_resamples, seed=e.seed)
        return verdict, cand, base

    # Gauges, canary checks, prefetch

    def refresh_gauges(self) -> None:
        """Sets the quality, rollout and live gauges from the registry and the live store."""
        state = self.registry.state()
        ROLLOUT_STATE.set(rollout_state_value(state))
        CANARY_FRACTION.set(state.canary_fraction if state.canary else 0.0)
        roles = [(state.production, "production"), (state.canary, "canary")]
        if self._last_candidate and self._last_candidate[0] not in (state.production, state.canary):
            roles.append((self._last_candidate[0], "candidate"))
        for gauge in (ACCURACY, PRECISION, F1, LIVE_MEAN_RATING, LIVE_THUMBS_DOWN_RATE, LIVE_IGNORE_RATE):
            gauge.clear()
        LIVE_FEEDBACK.clear()
        now = time.time()
        for version, role in roles:
            if not version:
                continue
            result = read_stored(self.registry, version)
            if result is not None:
                for gauge, name in ((ACCURACY, "accuracy"), (PRECISION, "precision"), (F1, "f1")):
                    if name in result.metrics:
                        gauge.labels(version, role).set(result.metrics[name]["value"])
            if role == "candidate":
                continue
            stats = self.store.stats(version, now - self.settings.live.gauge_window_s, now)
            LIVE_FEEDBACK.labels(version).set(stats.feedback)
            for gauge, value in (
                (LIVE_MEAN_RATING, stats.mean_rating),
                (LIVE_THUMBS_DOWN_RATE, stats.thumbs_down_rate),
                (LIVE_IGNORE_RATE, stats.ignore_rate),
            ):
                if value is not None:
                    gauge.labels(version).set(value)

    def _prefetch_production(self) -> None:
        """Evaluates production in the background while idle, so the next gate only runs the candidate."""
        production = self.registry.state().production
        if not production or self.evaluator.lock.locked() or (self._prefetch and self._prefetch.is_alive()):
            return
        try:
            if self.evaluator.stored(production) is not None:
                return
        except NotFound:
            return

        def run() -> None:
            try:
                self._evaluate(production, reuse=True)
                self.refresh_gauges()
            except EvaluationCancelled:
                pass
            except Exception:
                log.exception("background evaluation of production %s failed", production)

        self._prefetch = threading.Thread(target=run, name="evaluator-prefetch", daemon=True)
        self._prefetch.start()

    async def _monitor(self) -> None:
        last_prune = 0.0
        while True:
            try:
                await asyncio.to_thread(self.rollout.check_canary)
                await asyncio.to_thread(self.refresh_gauges)
                if self.settings.evaluation.prefetch_production:
                    await asyncio.to_thread(self._prefetch_production)
                if time.monotonic() - last_prune > 3600:
                    await asyncio.to_thread(self.store.prune, time.time() - self.settings.live.retention_s)
                    last_prune = time.monotonic()
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
        if self._prefetch is not None:
            await asyncio.to_thread(self._prefetch.join, 60)
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
