"""The evaluator's data plane: gates candidates, writes their reports, moves the rollout, keeps the gauges."""

from __future__ import annotations

import logging
import threading
import time
import uuid

from flywheel_common.errors import InvalidArgument, NotFound
from flywheel_common.registry import ModelRegistry, ModelVersion, RolloutState
from flywheel_evaluator import reports
from flywheel_evaluator.evaluation import (
    EvaluationCancelled,
    EvaluationResult,
    Evaluator,
    GoldenSet,
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
    LIVE_VOTERS,
    PRECISION,
    PRUNED_BYTES,
    ROLLOUT_STATE,
    rollout_state_value,
)
from flywheel_evaluator.rollout import Decision, DecisionLog, Emit, RolloutController
from flywheel_evaluator.settings import EvaluatorSettings
from flywheel_proto.flywheel.events.v1 import events_pb2

log = logging.getLogger(__name__)

# Production may move while a candidate is evaluated; the gate judges again at most this often.
_GATE_ATTEMPTS = 3
_PRUNE_EVERY_S = 3600.0


class Gatekeeper:
    """Evaluates, judges and rolls out; `EvaluatorServicer` and the candidate consumer call it."""

    def __init__(
        self,
        settings: EvaluatorSettings,
        registry: ModelRegistry,
        golden: GoldenSet,
        store: LiveStore,
        emit: Emit | None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.evaluator = Evaluator(registry, golden, settings.evaluation)
        self.decisions = DecisionLog(registry, emit)
        self.rollout = RolloutController(registry, store, self.decisions, settings.canary)
        # Set on shutdown: an evaluation in progress stops (its candidate is gated again after a restart).
        self.stopping = threading.Event()
        self._last_candidate: tuple[str, EvaluationResult] | None = None
        self._prefetch: threading.Thread | None = None
        self._last_prune = -_PRUNE_EVERY_S  # the first tick prunes

    # Evaluations and their reports

    def _evaluate(self, version: str, *, reuse: bool) -> EvaluationResult:
        result = self.evaluator.evaluate(version, reuse=reuse, stop=self.stopping)
        reports.write_evaluation(self.registry, result)
        return result

    def evaluate_now(self, version: str, actor: str) -> EvaluationResult:
        """Evaluates a version afresh (the Evaluate RPC); the gate reuses what it stores, so who
        asked is logged."""
        self.registry.servable(version)
        result = self._evaluate(version, reuse=False)
        log.info("evaluated %s afresh for %s", version, actor, extra={"version": version, "actor": actor})
        self.refresh_gauges()
        return result

    def report(self, version: str) -> tuple[EvaluationResult | None, str]:
        """A version's last stored evaluation and its summary."""
        self.registry.get(version)
        return read_stored(self.registry, version), self.summary(version)

    def summary(self, version: str) -> str:
        """A version's report for people: the gate's when it was gated, else its evaluation's."""
        return reports.summary(self.registry, version)

    # The gate

    def process_candidate(self, candidate: events_pb2.ModelCandidate) -> None:
        """Gates one candidate: evaluates it and production, decides, rolls out, records and emits."""
        version = candidate.version
        existing = self.decisions.gate_decision(version)
        if existing is not None:
            # Decided before a failure, a restart or a replay: its move and decision were committed
            # together, so finish recording and sending it; decide and move nothing new.
            log.info("candidate %s was gated before (decision %s)", version, existing.decision_id)
            self.decisions.send_again(existing)
            return
        # NotFound, RefusedCandidate: the consumer dead-letters the event.
        lineage = announced_lineage(self.registry.get(version), candidate)
        baseline = self.registry.state().production
        if baseline == version:
            log.info("candidate %s is already production; nothing to gate", version)
            return
        log.info("gating candidate %s (parent %s) against %s", version, lineage["parent_version"], baseline)
        for _ in range(_GATE_ATTEMPTS):
            verdict, cand, base = self._gate(version, baseline)
            current = self.registry.state().production
            if current in (baseline, version):
                break
            # Production moved while the candidate was evaluated (a canary was promoted, an admin
            # rolled back): judge against what serves now; stored evaluations make this quick.
            log.info("production moved from %s to %s during the gate; judging again", baseline, current)
            baseline = current
        decision_id = uuid.uuid4().hex
        settings = {
            "gate": self.settings.gate.model_dump(),
            "canary": self.settings.canary.model_dump(),
            **lineage,
        }

        def write_report(rollout: str) -> None:
            report = reports.gate_json(
                verdict, cand, base, decision_id=decision_id, action=rollout, settings=settings
            )
            reports.write_gate(self.registry, version, report)

        if cand is not None:
            self._last_candidate = (version, cand)
        self.rollout.after_gate(verdict, decision_id=decision_id, write_report=write_report)
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

    # Admin moves and reads

    def decisions_newest_first(self, limit: int = 0) -> list[Decision]:
        """Recorded decisions, newest first (all of them when `limit` is 0)."""
        newest = list(reversed(self.decisions.all()))
        return newest[:limit] if limit else newest

    def state(self) -> RolloutState:
        """The registry's rollout state."""
        return self.registry.state()

    def promote(self, version: str, *, reason: str, actor: str, request_id: str = "") -> RolloutState:
        """An admin makes a version production (once per request id)."""
        self.rollout.promote(version, reason=reason, actor=actor, request_id=request_id)
        return self._after_move()

    def rollback(self, version: str, *, reason: str, actor: str, request_id: str = "") -> RolloutState:
        """An admin rolls back (to `version`, else the previous production); once per request id."""
        self.rollout.rollback(version, reason=reason, actor=actor, request_id=request_id)
        return self._after_move()

    def pin(self, version: str, *, reason: str, actor: str) -> RolloutState:
        """An admin pins production to a version (or unpins when empty)."""
        self.rollout.pin(version, reason=reason, actor=actor)
        return self._after_move()

    def set_auto_rollout(self, enabled: bool, *, actor: str) -> RolloutState:
        """An admin turns automatic canaries on or off."""
        self.rollout.set_auto_rollout(enabled, actor=actor)
        return self._after_move()

    def _after_move(self) -> RolloutState:
        self.refresh_gauges()
        return self.registry.state()

    # Periodic work: canary checks, gauges, prefetch, pruning

    def tick(self) -> None:
        """One round of the periodic work; the app runs it every `canary.check_interval_s`."""
        try:
            self.decisions.flush()
        except Exception as exc:  # Kafka or the disk; the canary is judged all the same
            log.warning("decisions not recorded or sent yet (%s); the next tick tries again", exc)
        self.rollout.check_canary()
        self.refresh_gauges()
        if self.settings.evaluation.prefetch_production:
            self._prefetch_production()
        if time.monotonic() - self._last_prune > _PRUNE_EVERY_S:
            self.store.prune(time.time() - self.settings.live.retention_s)
            self.prune_versions()
            self._last_prune = time.monotonic()

    def prune_versions(self) -> None:
        """Removes the weights of versions nothing needs any more (`settings.retention`)."""
        retention = self.settings.retention
        if not retention.enabled:
            return
        try:
            pruned = self.registry.prune(retention.keep_latest)
        except OSError:
            log.exception("pruning model versions failed; they are kept")
            return
        for item in pruned:
            PRUNED_BYTES.inc(item.freed_bytes)

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
        LIVE_VOTERS.clear()
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
            LIVE_VOTERS.labels(version).set(stats.sessions)
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

    def stop(self, timeout: float = 60.0) -> None:
        """Stops an evaluation in progress and waits for a background one."""
        self.stopping.set()
        if self._prefetch is not None:
            self._prefetch.join(timeout)


class RefusedCandidate(InvalidArgument):
    """An announcement the gate will not act on (retried, it would be refused again)."""


def announced_lineage(found: ModelVersion, candidate: events_pb2.ModelCandidate) -> dict[str, str]:
    """The lineage a training job registered with the candidate its announcement names.

    Announcements on Kafka are not signed, so one proves nothing by itself: only a version a
    training job registered as a candidate is gated, and only on an announcement naming that job (a
    base model, a version registered by hand, or a job id the version was not registered with are
    refused). The gate's record takes parent, batch and job from the registry, not from the event.
    """
    if found.kind != "candidate":
        raise RefusedCandidate(f"{found.version} is a {found.kind} version, not a training job's candidate")
    registered = found.manifest.get("lineage") or {}
    lineage = {name: str(registered.get(name, "")) for name in ("parent_version", "dataset_id", "job_id")}
    if not lineage["job_id"] or candidate.job_id != lineage["job_id"]:
        raise RefusedCandidate(
            f"the announcement of {found.version} does not name the job that registered it"
        )
    return lineage
