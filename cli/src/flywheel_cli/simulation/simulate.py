"""Simulated visitors and an expert reviewer drive the running system over gRPC, round after round.

How a round goes:

1. **Visitors.** The `traffic` questions are shuffled (seeded) and split evenly over the rounds; each
   visitor (own session id) asks one question about its page through `InferenceService.Answer`.
2. **Rating.** The visitor scores the answer against the acceptable answers (token F1) and rates it
   with `rating_from_f1`: F1 < 0.2 → 1, < 0.4 → 2, < 0.6 → 3, < 0.8 → 4, else 5; with probability
   `rating_noise` the rating moves one step up or down. Some visitors ignore the answer instead
   (probability `ignore_bad` when F1 < 0.2, `ignore_good` otherwise) and send `ignored`.
3. **Expert.** A share (`correction_share`) of the answers rated at or below `low_rating` get a
   correction from the expert reviewer: the first acceptable answer put in a sentence by one generic
   template (`correction_template`, default "The answer is {answer}.").
4. **Trainer.** The round waits for a training job over the round's feedback (`TrainerService`): if the
   trainer's thresholds did not cut a batch within `trigger_after_s`, it asks for one (`TriggerBatch`,
   admin token), then waits for the job to finish.
5. **Evaluator.** It waits for the gate's decision on the candidate (`ListDecisions`), and, while a
   canary runs (`GetRollout`), keeps visitors coming (the round's questions again, new sessions,
   ratings only) so the evaluator sees live signals, until the canary is promoted or rolled back.
6. **Exam.** The `exam` split (never trained on, never given to the gate) is asked through inference;
   no feedback is sent for it. Round 0 is the exam of the model serving before any feedback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from flywheel_cli.decisions import action_name, decision_json, timestamp
from flywheel_cli.simulation.report import ExamItem, ExamResult, Report, RoundResult, pct
from flywheel_cli.simulation.via_gateway import GatewayAnswer, GatewayVisitor, measure_overhead, retryable
from flywheel_eval.dataset import Dataset, QAItem, load_dataset
from flywheel_eval.metrics import score_item, summarize
from flywheel_model.retrieval import html_to_text
from flywheel_proto.flywheel.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from flywheel_proto.flywheel.events.v1 import events_pb2
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2, feedback_pb2_grpc
from flywheel_proto.flywheel.inference.v1 import inference_pb2, inference_pb2_grpc
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2, trainer_pb2_grpc

T = TypeVar("T")

# F1 cut points between ratings 1|2|3|4|5.
RATING_THRESHOLDS = (0.2, 0.4, 0.6, 0.8)
DEFAULT_TEMPLATE = "The answer is {answer}."
# A deadline passed under load is retried too: one slow answer must not end a run of an hour.
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)
_FINISHED_JOB = (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED)


class SimulationError(RuntimeError):
    """The system did not do what a round waits for (no job, no decision) within the timeouts."""


@dataclass(frozen=True)
class Targets:
    """Where each service listens."""

    inference: str = "127.0.0.1:50051"
    feedback: str = "127.0.0.1:50052"
    trainer: str = "127.0.0.1:50053"
    evaluator: str = "127.0.0.1:50054"


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens of the simulated visitor, expert reviewer and admin (the development ones)."""

    user: str = "dev-user-token"
    expert: str = "dev-expert-token"
    admin: str = "dev-admin-token"


@dataclass(frozen=True)
class SimulationConfig:
    """Every knob of a simulation; the defaults are the documented ones."""

    dataset: Path
    rounds: int = 3
    seed: int = 0
    # Traffic questions per round (None: the traffic split, divided evenly over the rounds).
    questions_per_round: int | None = None
    # Exam questions measured (None: all).
    exam_questions: int | None = None
    concurrency: int = 4
    rating_noise: float = 0.15
    ignore_bad: float = 0.3
    ignore_good: float = 0.05
    low_rating: int = 2
    correction_share: float = 0.8
    correction_template: str = DEFAULT_TEMPLATE
    max_new_tokens: int = 0
    # After the last round, visitors ask its questions again (ratings only) so the final model has
    # visitors' ratings in the report too.
    closing_visitors: bool = True
    request_timeout_s: float = 180.0
    # Seconds to wait for the trainer to cut a batch by itself before asking for one.
    trigger_after_s: float = 10.0
    job_timeout_s: float = 1800.0
    decision_timeout_s: float = 1200.0
    rollout_timeout_s: float = 900.0
    poll_s: float = 2.0
    targets: Targets = field(default_factory=Targets)
    tokens: Tokens = field(default_factory=Tokens)
    # The gateway's URL: visitors ask and rate through its HTTP API, as the widget does (the expert
    # and the exam still talk gRPC); None: visitors talk gRPC too.
    via_gateway: str | None = None
    # Questions asked both ways after the rounds, to measure the gateway's overhead per answer.
    overhead_questions: int = 8

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["dataset"] = str(self.dataset)
        data.pop("tokens")
        data["rating_thresholds"] = list(RATING_THRESHOLDS)
        return data


class Progress(Protocol):
    """What the simulation tells its user (a rich progress display, or nothing in tests)."""

    def log(self, message: str) -> None: ...

    def start(self, description: str, total: int | None) -> object: ...

    def advance(self, task: object, amount: int = 1) -> None: ...

    def update(self, task: object, description: str) -> None: ...

    def finish(self, task: object) -> None: ...


class QuietProgress:
    """A Progress that only collects the log lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)

    def start(self, description: str, total: int | None) -> object:
        return description

    def advance(self, task: object, amount: int = 1) -> None:
        pass

    def update(self, task: object, description: str) -> None:
        pass

    def finish(self, task: object) -> None:
        pass


# --- the simulated people --------------------------------------------------------------------------------


def rating_from_f1(f1: float, rng: random.Random, noise: float) -> int:
    """1-5 from the answer's F1 (cut points `RATING_THRESHOLDS`), moved one step with probability noise."""
    rating = 1 + sum(f1 >= cut for cut in RATING_THRESHOLDS)
    if rng.random() < noise:
        rating += rng.choice((-1, 1))
    return min(5, max(1, rating))


def ignores(f1: float, rng: random.Random, config: SimulationConfig) -> bool:
    """Whether the visitor closes the answer without rating it (bad answers are ignored more often)."""
    return rng.random() < (config.ignore_bad if f1 < RATING_THRESHOLDS[0] else config.ignore_good)


def correction_text(item: QAItem, template: str = DEFAULT_TEMPLATE) -> str:
    """The expert's correction: the first acceptable answer, in a sentence made by a generic template."""
    answer = item.answers[0].strip().rstrip(".") if item.answers else "not on this page"
    first, _, rest = answer.partition(" ")
    if first in ("The", "A", "An") and rest:
        # Mid-sentence, an answer's leading article is lower case ("The answer is the gc module.").
        answer = f"{first.lower()} {rest}"
    return template.format(answer=answer, question=item.question.strip())


def traffic_slices(dataset: Dataset, config: SimulationConfig) -> list[list[QAItem]]:
    """The traffic questions of each round: shuffled with the seed, split evenly (or N per round)."""
    items = dataset.split("traffic")
    random.Random(f"{config.seed}:traffic").shuffle(items)
    rounds = max(config.rounds, 1)
    if config.questions_per_round is not None:
        n = config.questions_per_round
        return [[items[(r * n + i) % len(items)] for i in range(n)] for r in range(rounds)]
    size, extra = divmod(len(items), rounds)
    slices, start = [], 0
    for r in range(rounds):
        end = start + size + (1 if r < extra else 0)
        slices.append(items[start:end])
        start = end
    return slices


def exam_items(dataset: Dataset, config: SimulationConfig) -> list[QAItem]:
    """The exam questions measured each round (all, or a seeded sample)."""
    items = dataset.split("exam")
    if config.exam_questions is not None and config.exam_questions < len(items):
        items = random.Random(f"{config.seed}:exam").sample(items, config.exam_questions)
    return items


# --- talking to the system -------------------------------------------------------------------------------


def visitor_request(
    dataset: Dataset, item: QAItem, session_id: str, max_new_tokens: int = 0
) -> inference_pb2.AnswerRequest:
    """The `Answer` request a visitor's browser sends: the page's HTML, its URL and its own title
    (as `document.title` gives it), so the service builds the prompt the gate and the trainer see."""
    page_file = (dataset.root / "pages" / f"{item.page}.html").resolve()
    html = dataset.pages[item.page]
    return inference_pb2.AnswerRequest(
        page=inference_pb2.Page(url=page_file.as_uri(), title=page_title(html), html=html),
        question=item.question,
        session_id=session_id,
        options=inference_pb2.GenerationOptions(max_new_tokens=max_new_tokens),
    )


@functools.lru_cache(maxsize=64)
def page_title(html: str) -> str:
    """The page's `<title>`, as the model path reads it."""
    return html_to_text(html)[1]


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _grpc_retryable(error: Exception) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() in _RETRYABLE


async def _retry(
    call: Callable[[], Awaitable[T]],
    attempts: int = 6,
    retryable: Callable[[Exception], bool] = _grpc_retryable,
) -> T:
    """Retries a call that failed with UNAVAILABLE, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED (or as
    `retryable` says), backing off."""
    delay = 0.5
    for attempt in range(attempts):
        try:
            return await call()
        except Exception as err:
            if not retryable(err) or attempt == attempts - 1:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


@dataclass
class Visit:
    """One visitor's question, the answer, and what the visitor and the expert did with it."""

    item: QAItem
    answer: str
    model_version: str
    query_id: str
    latency_ms: float
    f1: float
    rating: int | None
    corrected: bool


class Simulation:
    """Runs the rounds against a running stack and builds the report."""

    def __init__(self, config: SimulationConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress: Progress = progress or QuietProgress()
        self.dataset = load_dataset(config.dataset)
        self.run_id = uuid.uuid4().hex[:8]
        self._channels: list[grpc.aio.Channel] = []
        self.gateway: GatewayVisitor | None = None

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        )
        self._channels.append(channel)
        return channel

    async def run(self) -> Report:
        """Round 0 (the exam of the serving model), then the configured rounds; returns the report."""
        config = self.config
        targets = config.targets
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._channel(targets.inference))
        self.feedback = feedback_pb2_grpc.FeedbackServiceStub(self._channel(targets.feedback))
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(self._channel(targets.trainer))
        self.evaluator = evaluator_pb2_grpc.EvaluatorServiceStub(self._channel(targets.evaluator))
        if config.via_gateway:
            self.gateway = GatewayVisitor(config.via_gateway, timeout_s=config.request_timeout_s)
        started = time.monotonic()
        report = Report(
            dataset=self.dataset.name,
            dataset_version=self.dataset.version,
            started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            settings=config.to_json(),
        )
        try:
            exam = exam_items(self.dataset, config)
            slices = traffic_slices(self.dataset, config)
            self.progress.log(
                f"dataset {self.dataset.version}: {len(exam)} exam questions, "
                f"{sum(map(len, slices))} traffic questions over {config.rounds} round(s)"
            )
            t0 = time.monotonic()
            result = await self._exam(0, exam)
            production = await self._production()
            report.rounds.append(
                RoundResult(
                    0,
                    production,
                    result,
                    duration_s=time.monotonic() - t0,
                    timings_s={"exam": time.monotonic() - t0},
                )
            )
            self.progress.log(f"round 0 ({production}): exam accuracy {pct(result.accuracy)}")
            for number in range(1, config.rounds + 1):
                report.rounds.append(await self._round(number, slices[number - 1], exam, report))
            if config.closing_visitors:
                closing = await self._visitors(
                    config.rounds + 1, slices[-1], report, phase="closing", expert=False
                )
                report.notes.append(
                    f"After the last round {len(closing)} visitors asked its questions again (ratings "
                    "only), so the final model has visitors' ratings too."
                )
            if self.gateway is not None:
                await self._gateway_overhead(exam, report)
        finally:
            report.wall_time_s = time.monotonic() - started
            for channel in self._channels:
                await channel.close()
            if self.gateway is not None:
                await self.gateway.close()
        return report

    # --- one round -------------------------------------------------------------------------------------

    async def _round(
        self, number: int, traffic: Sequence[QAItem], exam: Sequence[QAItem], report: Report
    ) -> RoundResult:
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        known_jobs = {job.job_id for job in (await self._jobs())}
        known_decisions = {d.decision_id for d in (await self._decisions())}
        visits = await self._visitors(number, traffic, report, phase="visitors", expert=True)
        timings["visitors"] = time.monotonic() - t0

        t1 = time.monotonic()
        jobs = await self._wait_for_jobs(number, known_jobs)
        timings["training"] = time.monotonic() - t1

        t2 = time.monotonic()
        candidates = [j.candidate_version for j in jobs if j.candidate_version]
        decisions = await self._wait_for_decisions(number, candidates, known_decisions)
        timings["gate"] = time.monotonic() - t2

        t3 = time.monotonic()
        canary_visits = await self._settle_rollout(number, traffic, report)
        timings["rollout"] = time.monotonic() - t3
        decisions = [d for d in await self._decisions() if d.decision_id not in known_decisions]
        decisions.sort(key=lambda d: (d.created_at.seconds, d.created_at.nanos))
        rollout = rollout_outcome(candidates, decisions, await self._production())

        t4 = time.monotonic()
        production = await self._production()
        await self._await_serving(production, exam[0])
        result = await self._exam(number, exam)
        timings["exam"] = time.monotonic() - t4

        rated = [v.rating for v in visits if v.rating is not None]
        round_result = RoundResult(
            round=number,
            model_version=production,
            exam=result,
            duration_s=time.monotonic() - t0,
            traffic={
                "asked": len(visits),
                "rated": len(rated),
                "ignored": sum(v.rating is None for v in visits),
                "corrections": sum(v.corrected for v in visits),
                "mean_rating": sum(rated) / len(rated) if rated else None,
                "answered_by": dict(Counter(v.model_version for v in visits)),
                "canary_visits": canary_visits,
            },
            jobs=[_job_json(j) for j in jobs],
            decisions=[decision_json(d) for d in decisions],
            rollout=rollout,
            timings_s=timings,
        )
        self.progress.log(
            f"round {number} done in {round_result.duration_s / 60:.1f} min: {round_result.gate}; "
            f"serving {production}, exam accuracy {pct(result.accuracy)}"
        )
        return round_result

    # --- visitors and the expert -----------------------------------------------------------------------

    async def _visit(self, item: QAItem, session: str, rng: random.Random, *, expert: bool) -> Visit:
        config = self.config
        started = time.perf_counter()
        request = self._request(item, session)
        gateway = self.gateway
        asked: GatewayAnswer | None = None
        if gateway is None:
            response = await _retry(lambda: self.inference.Answer(request, timeout=config.request_timeout_s))
        else:
            # The gateway gives the visitor a session of its own (the id is not ours to choose).
            asked = await _retry(lambda: gateway.ask(request.page, request.question), retryable=retryable)
            response = inference_pb2.AnswerResponse(
                query_id=asked.query_id, answer=asked.answer, model_version=asked.model_version
            )
        latency_ms = (time.perf_counter() - started) * 1000
        scores = score_item(response.answer, item.answers)
        rating = (
            None if ignores(scores.f1, rng, config) else rating_from_f1(scores.f1, rng, config.rating_noise)
        )
        key = f"sim-{response.query_id[-32:]}-{'ignored' if rating is None else 'rating'}"
        if gateway is not None and asked is not None:
            answered = asked
            await _retry(lambda: gateway.rate(answered, rating=rating, key=key), retryable=retryable)
        else:
            signal: dict[str, Any] = {"ignored": True} if rating is None else {"rating": rating}
            feedback = feedback_pb2.SubmitFeedbackRequest(
                query_id=response.query_id, session_id=session, idempotency_key=key, **signal
            )
            await _retry(
                lambda: self.feedback.SubmitFeedback(
                    feedback, metadata=_bearer(config.tokens.user), timeout=30
                )
            )
        corrected = False
        low = rating is not None and rating <= config.low_rating
        if expert and low and item.answers and rng.random() < config.correction_share:
            correction = feedback_pb2.SubmitCorrectionRequest(
                query_id=response.query_id,
                corrected_answer=correction_text(item, config.correction_template),
                note="simulated expert review",
                idempotency_key=f"sim-{response.query_id[-32:]}-correction",
            )
            await _retry(
                lambda: self.feedback.SubmitCorrection(
                    correction, metadata=_bearer(config.tokens.expert), timeout=30
                )
            )
            corrected = True
        return Visit(
            item,
            response.answer,
            response.model_version,
            response.query_id,
            latency_ms,
            scores.f1,
            rating,
            corrected,
        )

    async def _visitors(
        self,
        number: int,
        items: Sequence[QAItem],
        report: Report,
        *,
        phase: str,
        expert: bool,
        stop: asyncio.Event | None = None,
    ) -> list[Visit]:
        """Visitors ask `items` (each once, or over and over until `stop` is set)."""
        config = self.config
        task = self.progress.start(f"round {number}: {phase}", None if stop else len(items))
        semaphore = asyncio.Semaphore(config.concurrency)
        visits: list[Visit] = []
        counter = iter(range(10**9))

        async def one(item: QAItem, index: int) -> None:
            async with semaphore:
                if stop is not None and stop.is_set():
                    return
                session = f"sim-{self.run_id}-r{number}-{phase}-{index}"
                rng = random.Random(f"{config.seed}:{number}:{phase}:{item.id}:{index}")
                visit = await self._visit(item, session, rng, expert=expert)
                visits.append(visit)
                report.ratings(visit.model_version).add(visit.rating, corrected=visit.corrected)
                self.progress.advance(task)

        if stop is None:
            await asyncio.gather(*(one(item, next(counter)) for item in items))
        else:
            while not stop.is_set():
                await asyncio.gather(*(one(item, next(counter)) for item in items))
        self.progress.finish(task)
        return visits

    def _request(self, item: QAItem, session: str) -> inference_pb2.AnswerRequest:
        return visitor_request(self.dataset, item, session, self.config.max_new_tokens)

    async def _gateway_overhead(self, exam: Sequence[QAItem], report: Report) -> None:
        """Asks exam questions both over gRPC and through the gateway; the note says what it added."""
        assert self.gateway is not None
        items = list(exam[: self.config.overhead_questions])
        # The server's default answer length both ways: the gateway's API sets no generation options.
        requests = [
            visitor_request(self.dataset, item, f"sim-{self.run_id}-overhead-{i}")
            for i, item in enumerate(items)
        ]
        measured = await measure_overhead(
            self.gateway, self.inference, requests, timeout_s=self.config.request_timeout_s
        )
        report.settings["gateway_overhead"] = measured
        report.notes.append(
            f"Visitors asked and rated through the gateway's HTTP API (answers as Server-Sent Events). "
            f"On {measured['answers']} exam questions asked both ways after the rounds, the gateway added "
            f"{measured['overhead_median_ms']:.0f} ms per answer (median of the paired differences; a "
            f"whole answer took {measured['grpc_median_ms']:.0f} ms over gRPC, "
            f"{measured['gateway_median_ms']:.0f} ms through the gateway)."
        )

    # --- the exam --------------------------------------------------------------------------------------

    async def _exam(self, number: int, items: Sequence[QAItem]) -> ExamResult:
        config = self.config
        task = self.progress.start(f"round {number}: exam", len(items))
        semaphore = asyncio.Semaphore(config.concurrency)

        async def one(index: int, item: QAItem) -> ExamItem:
            async with semaphore:
                session = f"sim-{self.run_id}-r{number}-exam-{index}"
                started = time.perf_counter()
                response = await _retry(
                    lambda: self.inference.Answer(
                        self._request(item, session), timeout=config.request_timeout_s
                    )
                )
                latency_ms = (time.perf_counter() - started) * 1000
                self.progress.advance(task)
                scores = score_item(response.answer, item.answers)
                return ExamItem(
                    item.id,
                    item.question,
                    response.answer,
                    response.model_version,
                    latency_ms,
                    scores.contains,
                    scores.precision,
                    scores.f1,
                )

        results = await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
        self.progress.finish(task)
        summary = summarize(
            [score_item(r.answer, item.answers) for r, item in zip(results, items, strict=True)],
            latencies=[r.latency_ms for r in results],
            seed=config.seed,
        )
        assert summary.latency_p50 is not None and summary.latency_p95 is not None
        return ExamResult(
            n=summary.n,
            accuracy=summary.accuracy,
            precision=summary.precision,
            f1=summary.f1,
            exact_match=summary.exact_match,
            latency_p50_ms=summary.latency_p50,
            latency_p95_ms=summary.latency_p95,
            versions=dict(Counter(r.model_version for r in results)),
            items=list(results),
        )

    # --- trainer, evaluator, rollout -------------------------------------------------------------------

    async def _jobs(self) -> list[trainer_pb2.Job]:
        admin = _bearer(self.config.tokens.admin)
        reply = await _retry(
            lambda: self.trainer.ListJobs(trainer_pb2.ListJobsRequest(), metadata=admin, timeout=30)
        )
        return list(reply.jobs)

    async def _decisions(self) -> list[evaluator_pb2.Decision]:
        admin = _bearer(self.config.tokens.admin)
        reply = await _retry(
            lambda: self.evaluator.ListDecisions(
                evaluator_pb2.ListDecisionsRequest(), metadata=admin, timeout=30
            )
        )
        return list(reply.decisions)

    async def _rollout(self) -> evaluator_pb2.Rollout:
        admin = _bearer(self.config.tokens.admin)
        return await _retry(
            lambda: self.evaluator.GetRollout(evaluator_pb2.GetRolloutRequest(), metadata=admin, timeout=30)
        )

    async def _production(self) -> str:
        return (await self._rollout()).production

    async def _await_serving(self, version: str, item: QAItem) -> None:
        """Inference follows the registry by polling it: waits until it answers with `version`."""
        deadline = time.monotonic() + self.config.rollout_timeout_s
        probe = self._request(item, f"sim-{self.run_id}-probe")
        probe.options.max_new_tokens = 1
        while True:
            response = await _retry(
                lambda: self.inference.Answer(probe, timeout=self.config.request_timeout_s)
            )
            if response.model_version == version:
                return
            if time.monotonic() > deadline:
                raise SimulationError(f"inference still serves {response.model_version}, not {version}")
            await asyncio.sleep(self.config.poll_s)

    async def _wait_for_jobs(self, number: int, known: set[str]) -> list[trainer_pb2.Job]:
        """The round's training jobs, once all of them finished (asking for a batch if none was cut)."""
        config = self.config
        task = self.progress.start(f"round {number}: training", None)
        admin = _bearer(config.tokens.admin)
        deadline = time.monotonic() + config.job_timeout_s
        trigger_at = time.monotonic() + config.trigger_after_s
        triggered = False
        states: dict[str, int] = {}
        while True:
            jobs = [j for j in await self._jobs() if j.job_id not in known]
            for job in jobs:
                if states.get(job.job_id) != job.state:
                    states[job.job_id] = job.state
                    self.progress.log(
                        f"round {number}: job {job.job_id} ({job.examples} new examples) "
                        f"{trainer_pb2.JobState.Name(job.state).removeprefix('JOB_STATE_').lower()}"
                        + (f": {job.reason}" if job.reason else "")
                    )
                    self.progress.update(task, f"round {number}: training ({job.examples} new examples)")
            if jobs and all(j.state in _FINISHED_JOB for j in jobs):
                self.progress.finish(task)
                return jobs
            if not jobs and not triggered and time.monotonic() >= trigger_at:
                reply = await _retry(
                    lambda: self.trainer.TriggerBatch(
                        trainer_pb2.TriggerBatchRequest(), metadata=admin, timeout=60
                    )
                )
                if reply.job_id:
                    triggered = True
                    self.progress.log(f"round {number}: asked the trainer for a batch: job {reply.job_id}")
                else:
                    # The trainer has not stored the round's examples yet; ask again shortly.
                    trigger_at = time.monotonic() + 5 * config.poll_s
            if time.monotonic() > deadline:
                raise SimulationError(
                    f"round {number}: no finished training job after {config.job_timeout_s:.0f} s"
                )
            await asyncio.sleep(config.poll_s)

    async def _wait_for_decisions(
        self, number: int, candidates: Sequence[str], known: set[str]
    ) -> list[evaluator_pb2.Decision]:
        """The gate's decision on every candidate of the round."""
        if not candidates:
            return []
        config = self.config
        task = self.progress.start(f"round {number}: gate on {', '.join(candidates)}", None)
        deadline = time.monotonic() + config.decision_timeout_s
        while True:
            decisions = [d for d in await self._decisions() if d.decision_id not in known]
            decided = {d.version for d in decisions}
            if all(c in decided for c in candidates):
                for d in decisions:
                    verdict = "passed" if d.passed else "failed"
                    self.progress.log(
                        f"round {number}: gate {verdict} for {d.version} "
                        f"({action_name(d.action)}): {'; '.join(d.reasons)}"
                    )
                self.progress.finish(task)
                return decisions
            if time.monotonic() > deadline:
                raise SimulationError(
                    f"round {number}: no gate decision on {', '.join(candidates)} after "
                    f"{config.decision_timeout_s:.0f} s"
                )
            await asyncio.sleep(config.poll_s)

    async def _settle_rollout(self, number: int, traffic: Sequence[QAItem], report: Report) -> int:
        """Keeps visitors coming while a canary runs (the evaluator judges it on their feedback)."""
        config = self.config
        state = await self._rollout()
        if not state.canary:
            return 0
        self.progress.log(
            f"round {number}: canary {state.canary} at {state.canary_fraction:.0%}; "
            "visitors keep coming until it is decided"
        )
        stop = asyncio.Event()
        visitors = asyncio.create_task(
            self._visitors(number, traffic, report, phase="canary", expert=False, stop=stop)
        )
        deadline = time.monotonic() + config.rollout_timeout_s
        try:
            while state.canary:
                if visitors.done():
                    visitors.result()  # raises what went wrong
                if time.monotonic() > deadline:
                    raise SimulationError(
                        f"round {number}: canary {state.canary} still running after "
                        f"{config.rollout_timeout_s:.0f} s"
                    )
                await asyncio.sleep(config.poll_s)
                state = await self._rollout()
        finally:
            stop.set()
        visits = await visitors
        self.progress.log(
            f"round {number}: canary over after {len(visits)} visits; production is {state.production}"
        )
        return len(visits)


def rollout_outcome(
    candidates: Sequence[str], decisions: Sequence[evaluator_pb2.Decision], production: str
) -> str:
    """How the round's rollout ended, in a few words, from the decisions recorded during it."""
    if not candidates:
        return ""
    words = {
        events_pb2.DECISION_ACTION_CANARY_PROMOTE: "promoted after canary",
        events_pb2.DECISION_ACTION_ROLLBACK: "canary rolled back",
    }
    for decision in reversed(decisions):
        if decision.version in candidates and decision.action in words:
            return f"{words[decision.action]}; {production} serves"
    if production in candidates:
        return f"promoted; {production} serves"
    return f"{production} still serves"


def _job_json(job: trainer_pb2.Job) -> dict[str, Any]:
    started, finished = job.started_at, job.finished_at
    return {
        "job_id": job.job_id,
        "dataset_id": job.dataset_id,
        "base_version": job.base_version,
        "state": trainer_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_"),
        "reason": job.reason,
        "candidate_version": job.candidate_version,
        "examples": job.examples,
        "created_at": timestamp(job.created_at),
        "started_at": timestamp(started),
        "finished_at": timestamp(finished),
        "run_s": (finished.ToSeconds() - started.ToSeconds())
        if started.seconds and finished.seconds
        else None,
        "launcher": job.launcher,
    }
