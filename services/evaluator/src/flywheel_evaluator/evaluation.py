"""Runs a model version over the golden set on the serving path and scores it with flywheel_eval."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flywheel_common.errors import FailedPrecondition
from flywheel_common.registry import ModelRegistry, now_iso
from flywheel_eval.dataset import QA_FILE, Dataset, load_dataset
from flywheel_eval.metrics import Estimate, ItemScores, bootstrap, is_token_span, score_item, summarize
from flywheel_evaluator.metrics import EVALUATION_DURATION, EVALUATION_STARTED, EVALUATIONS
from flywheel_evaluator.settings import EvaluationSettings, GoldenSettings
from flywheel_model.engine import AnswerEngine, EngineSettings
from flywheel_model.generation import SamplingParams
from flywheel_model.prompt import build_messages
from flywheel_model.retrieval import Passage, html_to_text

log = logging.getLogger(__name__)

EVALUATION_JSON = "evaluation.json"


class EvaluationCancelled(Exception):
    """The evaluation was stopped (shutdown) before every question was answered."""


@dataclass(frozen=True)
class GoldenItem:
    """One golden question with its page already reduced to the text the model reads."""

    id: str
    question: str
    answers: tuple[str, ...]
    page_text: str
    title: str

    @property
    def answerable(self) -> bool:
        return bool(self.answers)


@dataclass(frozen=True)
class GoldenSet:
    """The items of every configured golden set (one split), with a name that pins their content."""

    name: str
    split: str
    items: tuple[GoldenItem, ...]

    @property
    def answerable(self) -> int:
        return sum(item.answerable for item in self.items)


GOLDEN_DIR = "golden"


def register_golden(dataset: Dataset, artifact_root: Path) -> Path:
    """Copies a golden set into the artifact store once, named by its content version
    (`golden/<name>@<hash>/`), so every report's golden set can be found and re-run later."""
    folder = Path(artifact_root) / GOLDEN_DIR
    target = folder / dataset.version
    if (target / QA_FILE).is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
    try:
        shutil.copytree(dataset.root, staging / "set", ignore=shutil.ignore_patterns(".*", "__pycache__"))
        if load_dataset(staging / "set").content_hash != dataset.content_hash:
            raise ValueError(f"{dataset.root} changed while it was copied")
        try:
            os.rename(staging / "set", target)
        except OSError:
            if not (target / QA_FILE).is_file():  # not merely another replica's copy of the same set
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("registered golden set %s in %s", dataset.version, target)
    return target


def load_golden(settings: GoldenSettings, *, register_in: Path | None = None) -> GoldenSet:
    """Loads the golden set(s) (registering each in the artifact store under `register_in`); item ids
    are prefixed by the set's name when there is more than one."""
    roots = [settings.dataset, *settings.extra_datasets]
    items: list[GoldenItem] = []
    names = []
    for root in roots:
        dataset = load_dataset(root)
        if register_in is not None:
            register_golden(dataset, register_in)
        split = dataset.split(settings.split)
        if settings.limit:
            split = split[: settings.limit]
        if not split:
            raise ValueError(f"golden set {root} has no {settings.split!r} items")
        pages = {page_id: html_to_text(html) for page_id, html in dataset.pages.items()}
        prefix = f"{dataset.name}/" if len(roots) > 1 else ""
        for qa in split:
            text, title = pages[qa.page]
            items.append(GoldenItem(prefix + qa.id, qa.question, qa.answers, text, title))
        limit = f"[:{settings.limit}]" if settings.limit else ""
        names.append(f"{dataset.version}:{settings.split}{limit}")
    return GoldenSet(name="+".join(names), split=settings.split, items=tuple(items))


def is_abstention(answer: str, phrases: Sequence[str]) -> bool:
    """Whether the answer says the page lacks the answer (on normalised token boundaries)."""
    return any(is_token_span(phrase, answer) for phrase in phrases)


@dataclass
class ItemResult:
    """One question's answer, its scores and timings."""

    id: str
    answerable: bool
    prediction: str
    abstained: bool
    contains: float
    precision: float
    f1: float
    exact_match: float
    length: int
    latency_ms: float
    ttft_ms: float
    completion_tokens: int = 0
    finish_reason: str = ""
    error: str = ""

    @property
    def fabricated(self) -> bool:
        """An unanswerable question that got an answer instead of an abstention."""
        return not self.answerable and not self.abstained and not self.error


def _ci(estimate: Estimate) -> dict[str, float]:
    return {"value": estimate.value, "ci_low": estimate.low, "ci_high": estimate.high}


@dataclass
class EvaluationResult:
    """A version's evaluation on one golden set: every item, and the metrics with 95% intervals."""

    version: str
    golden_set: str
    fingerprint: str
    items: list[ItemResult]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    created_at: str = ""
    duration_s: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def answerable(self) -> list[ItemResult]:
        return [item for item in self.items if item.answerable]

    @property
    def unanswerable(self) -> list[ItemResult]:
        return [item for item in self.items if not item.answerable]

    @property
    def fabrications(self) -> int:
        return sum(item.fabricated for item in self.items)

    @property
    def errors(self) -> int:
        return sum(bool(item.error) for item in self.items)

    def value(self, metric: str) -> float:
        """A metric's point value (NaN when the golden set gives no basis for it)."""
        return self.metrics.get(metric, {}).get("value", float("nan"))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = "evaluation"
        data["questions"] = len(self.items)
        data["questions_per_s"] = len(self.items) / self.duration_s if self.duration_s else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvaluationResult:
        return cls(
            version=data["version"],
            golden_set=data["golden_set"],
            fingerprint=data["fingerprint"],
            items=[ItemResult(**item) for item in data["items"]],
            metrics=data.get("metrics", {}),
            created_at=data.get("created_at", ""),
            duration_s=data.get("duration_s", 0.0),
            settings=data.get("settings", {}),
        )


def compute_metrics(
    items: Sequence[ItemResult], *, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Quality metrics over the answerable items, safety over the unanswerable, latency over all."""
    metrics: dict[str, dict[str, float]] = {}
    answerable = [item for item in items if item.answerable]
    latencies = [item.latency_ms for item in items]
    ttfts = [item.ttft_ms for item in items]
    if answerable:
        scores = [
            ItemScores(item.exact_match, item.f1, item.precision, item.contains, item.length)
            for item in answerable
        ]
        summary = summarize(scores, latencies=latencies, ttfts=ttfts, resamples=resamples, seed=seed)
        metrics["accuracy"] = _ci(summary.accuracy)
        metrics["precision"] = _ci(summary.precision)
        metrics["f1"] = _ci(summary.f1)
        metrics["exact_match"] = _ci(summary.exact_match)
        metrics["answer_length"] = _ci(summary.answer_length)
        metrics["false_abstention_rate"] = _ci(
            bootstrap([float(i.abstained) for i in answerable], resamples=resamples, seed=seed)
        )
    if items:
        for name, values, q in (
            ("latency_p50_ms", latencies, 0.5),
            ("latency_p95_ms", latencies, 0.95),
            ("ttft_p50_ms", ttfts, 0.5),
            ("ttft_p95_ms", ttfts, 0.95),
        ):
            metrics[name] = _ci(bootstrap(values, quantile=q, resamples=resamples, seed=seed))
        metrics["error_rate"] = _ci(
            bootstrap([float(bool(i.error)) for i in items], resamples=resamples, seed=seed)
        )
    unanswerable = [item for item in items if not item.answerable]
    if unanswerable:
        metrics["fabrication_rate"] = _ci(
            bootstrap([float(i.fabricated) for i in unanswerable], resamples=resamples, seed=seed)
        )
    return metrics


class Evaluator:
    """Evaluates registered versions on the golden set, one evaluation at a time, results stored."""

    def __init__(self, registry: ModelRegistry, golden: GoldenSet, settings: EvaluationSettings) -> None:
        self.registry = registry
        self.golden = golden
        self.settings = settings
        # Two evaluations at once would only share the same cores; the second waits.
        self.lock = threading.Lock()

    def fingerprint(self, version: str) -> str:
        """What an evaluation depends on: the model's files, the golden set's content, the settings.

        Content, not the version's name: the same model evaluated in another registry (a copy, a test)
        has the same fingerprint, so its stored evaluation may be reused there.
        """
        s = self.settings
        files = self.registry.get(version).manifest.get("files", {})
        parts = {
            "model": {k: v for k, v in files.items() if k.startswith("model/")},
            "golden": self.golden.name,
            "items": [item.id for item in self.golden.items],
            "max_new_tokens": s.max_new_tokens,
            "context_token_budget": s.context_token_budget,
            "passage_max_words": s.passage_max_words,
            "answer_candidates": s.answer_candidates,
            # How the prompt is laid out: code that asks another way measures anew.
            "prompt": build_messages("{title}", [Passage(0, "{passage}")], "{question}"),
            "abstention_phrases": s.abstention_phrases,
            "resamples": s.bootstrap_resamples,
            "seed": s.seed,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def stored(self, version: str) -> EvaluationResult | None:
        """The stored evaluation of a version when it matches today's golden set and settings."""
        path = self.registry.reports_dir / version / EVALUATION_JSON
        if not path.is_file():
            return None
        try:
            result = EvaluationResult.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable stored evaluation %s", path)
            return None
        if result.version != version or result.fingerprint != self.fingerprint(version):
            return None
        return result

    def evaluate(
        self,
        version: str,
        *,
        reuse: bool = True,
        stop: threading.Event | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> EvaluationResult:
        """The version's evaluation (a stored one when `reuse` allows), written to the registry."""
        with self.lock:
            # Stamped once the lock is held (evaluations run one at a time), so an evaluation that
            # never ends shows as an ever older start (FlywheelEvaluationStuck).
            EVALUATION_STARTED.set_to_current_time()
            try:
                return self._evaluate(version, reuse, stop, progress)
            finally:
                EVALUATION_STARTED.set(0)

    def _evaluate(
        self,
        version: str,
        reuse: bool,
        stop: threading.Event | None,
        progress: Callable[[int, int], None] | None,
    ) -> EvaluationResult:
        if reuse and self.settings.reuse_results:
            stored = self.stored(version)
            if stored is not None:
                log.info("reusing the stored evaluation of %s on %s", version, stored.golden_set)
                return stored
        try:
            result = self._run(version, stop, progress)
        except EvaluationCancelled:
            EVALUATIONS.labels("cancelled").inc()
            raise
        except Exception:
            EVALUATIONS.labels("error").inc()
            raise
        EVALUATIONS.labels("ok").inc()
        EVALUATION_DURATION.observe(result.duration_s)
        self.registry.write_report(version, EVALUATION_JSON, json.dumps(result.to_json(), indent=1))
        return result

    def _engine(self, version: str) -> AnswerEngine:
        """The serving engine over a version's ONNX model, sized for the evaluation's concurrency."""
        s = self.settings
        # Exactly the files registered: a candidate changed or damaged since fails, with the reason.
        model = self.registry.verify(version, "model")
        if not (model.model_dir / "model.onnx").is_file():
            raise FailedPrecondition(f"{version} has no ONNX model")
        return AnswerEngine(
            model.model_dir,
            s.ort,
            EngineSettings(
                context_token_budget=s.context_token_budget,
                passage_max_words=s.passage_max_words,
                max_batch=s.max_batch,
                answer_candidates=s.answer_candidates,
                max_queue=max(s.concurrency, s.max_batch) * 2,
            ),
        )

    def _score(
        self, version: str, engine: AnswerEngine, item: GoldenItem, params: SamplingParams
    ) -> ItemResult:
        """One golden question answered and scored; a failed answer is scored as a failure."""
        try:
            result = engine.answer(item.page_text, item.title, item.question, params)
            text, error = result.text, ""
            latency, ttft = result.total_ms, result.time_to_first_token_ms
            tokens, reason = result.completion_tokens, result.finish_reason
        except Exception as exc:  # one failed answer is scored as a failure, not a failed run
            log.warning("%s failed on %s: %s", version, item.id, exc)
            text, latency, ttft, tokens, reason = "", 0.0, 0.0, 0, "error"
            error = f"{type(exc).__name__}: {exc}"
        scores = score_item(text, item.answers)
        return ItemResult(
            id=item.id,
            answerable=item.answerable,
            prediction=text,
            abstained=is_abstention(text, self.settings.abstention_phrases),
            contains=scores.contains,
            precision=scores.precision,
            f1=scores.f1,
            exact_match=scores.exact_match,
            length=scores.length,
            latency_ms=latency,
            ttft_ms=ttft,
            completion_tokens=tokens,
            finish_reason=reason,
            error=error,
        )

    def _run(
        self,
        version: str,
        stop: threading.Event | None,
        progress: Callable[[int, int], None] | None,
    ) -> EvaluationResult:
        s = self.settings
        started = time.perf_counter()
        engine = self._engine(version)
        loaded = time.perf_counter()
        params = SamplingParams(max_new_tokens=s.max_new_tokens)
        done = 0
        done_lock = threading.Lock()
        total = len(self.golden.items)

        def answer(item: GoldenItem) -> ItemResult:
            nonlocal done
            if stop is not None and stop.is_set():
                raise EvaluationCancelled(f"evaluation of {version} stopped")
            scored = self._score(version, engine, item, params)
            with done_lock:
                done += 1
                if progress is not None:
                    progress(done, total)
            return scored

        try:
            with ThreadPoolExecutor(s.concurrency, thread_name_prefix=f"eval-{version}") as pool:
                items = list(pool.map(answer, self.golden.items))
        finally:
            engine.close(30.0)
        duration = time.perf_counter() - started
        log.info(
            "evaluated %s on %s: %d questions in %.1f s (model load %.1f s)",
            version,
            self.golden.name,
            len(items),
            duration,
            loaded - started,
        )
        return EvaluationResult(
            version=version,
            golden_set=self.golden.name,
            fingerprint=self.fingerprint(version),
            items=items,
            metrics=compute_metrics(items, resamples=s.bootstrap_resamples, seed=s.seed),
            created_at=now_iso(),
            duration_s=round(duration, 2),
            settings={
                "max_new_tokens": s.max_new_tokens,
                "concurrency": s.concurrency,
                "max_batch": s.max_batch,
                "model_load_s": round(loaded - started, 2),
                "provider": engine.provider,
            },
        )


def read_stored(registry: ModelRegistry, version: str) -> EvaluationResult | None:
    """The last stored evaluation of a version, whatever its settings (for reports and gauges)."""
    path = Path(registry.reports_dir) / version / EVALUATION_JSON
    if not path.is_file():
        return None
    try:
        return EvaluationResult.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None
