"""Answer-quality and latency metrics, with seeded, vectorised bootstrap confidence intervals."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0

# Per-item numbers: any iterable of floats, or a NumPy array of them.
Values = Iterable[float] | npt.NDArray[np.floating[Any]]

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
# An apostrophe inside a word ("don't", also curly) and a decimal point or thousands separator inside a
# number ("3.11", "1,000") are deleted, so the word or number stays one token.
_INNER_APOSTROPHE = re.compile(r"(?<=[^\W\d_])['\u2019\u02bc](?=[^\W\d_])")
_NUMBER_SEPARATOR = re.compile(r"(?<=\d)[.,](?=\d)")
# Bound the resample matrix so a large evaluation never needs gigabytes at once.
_MAX_CHUNK_ELEMENTS = 1 << 22


# --- normalisation ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _is_punctuation(char: str) -> bool:
    # SQuAD strips string.punctuation, which includes ASCII symbols such as + = < > $; Unicode categories
    # P* and S* are the same idea for curly quotes, dashes, guillemets and the like.
    return unicodedata.category(char)[0] in ("P", "S")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: NFKC, lower case, punctuation out, a/an/the out, whitespace collapsed."""
    # NFKC first so that composed and decomposed accents, ligatures and no-break spaces compare equal.
    text = unicodedata.normalize("NFKC", text).lower()
    text = _INNER_APOSTROPHE.sub("", text)
    text = _NUMBER_SEPARATOR.sub("", text)
    # Unlike SQuAD, other punctuation becomes a space instead of vanishing: answers about code are full of
    # it, and "os.remove(filename)" must share the tokens "os remove" with "os.remove()", not become one
    # fused token that matches nothing.
    text = "".join(" " if _is_punctuation(char) else char for char in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """Tokens of the normalised text (whitespace split after `normalize_answer`)."""
    return normalize_answer(text).split()


def answer_length(prediction: str) -> int:
    """Length of an answer in normalised tokens."""
    return len(answer_tokens(prediction))


# --- per-item scores -------------------------------------------------------------------------------------
#
# An empty list of acceptable answers marks an unanswerable item. As in SQuAD 2.0 it is scored as if the only
# acceptable answer were the empty string: only an answer that normalises to nothing scores 1.


def _golds(answers: Sequence[str]) -> list[list[str]]:
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not a single string")
    return [answer_tokens(answer) for answer in answers] or [[]]


def _overlap(prediction: list[str], gold: list[str]) -> int:
    return sum((Counter(prediction) & Counter(gold)).values())


def _precision_recall_f1(prediction: list[str], gold: list[str]) -> tuple[float, float, float]:
    if not prediction or not gold:
        # Both empty is a correct abstention; one empty is a miss.
        same = float(prediction == gold)
        return same, same, same
    common = _overlap(prediction, gold)
    if common == 0:
        return 0.0, 0.0, 0.0
    precision = common / len(prediction)
    recall = common / len(gold)
    return precision, recall, 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised acceptable answer, else 0.0."""
    predicted = answer_tokens(prediction)
    return float(any(predicted == gold for gold in _golds(answers)))


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Token F1 of the prediction, the maximum over the acceptable answers."""
    predicted = answer_tokens(prediction)
    return max(_precision_recall_f1(predicted, gold)[2] for gold in _golds(answers))


def precision(prediction: str, answers: Sequence[str]) -> float:
    """Share of the prediction's tokens found in the best acceptable answer (best = highest F1)."""
    predicted = answer_tokens(prediction)
    # Ties on F1 go to the higher precision so the choice never depends on the order of the answers.
    scores = [_precision_recall_f1(predicted, gold) for gold in _golds(answers)]
    return max(scores, key=lambda prf: (prf[2], prf[0]))[0]


def _contains_tokens(haystack: list[str], needle: list[str]) -> bool:
    if not needle:
        return not haystack
    # Padding with spaces makes substring search respect token boundaries ("3" is not in "311").
    return f" {' '.join(needle)} " in f" {' '.join(haystack)} "


def contains(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy: 1.0 if some normalised acceptable answer occurs, on token boundaries, in the prediction."""
    predicted = answer_tokens(prediction)
    return float(any(_contains_tokens(predicted, gold) for gold in _golds(answers)))


def is_token_span(needle: str, haystack: str) -> bool:
    """Whether normalised `needle` occurs in normalised `haystack` on token boundaries."""
    return _contains_tokens(answer_tokens(haystack), answer_tokens(needle))


@dataclass(frozen=True, slots=True)
class ItemScores:
    """All per-item quality scores of one answer."""

    exact_match: float
    f1: float
    precision: float
    contains: float
    length: int


def score_item(prediction: str, answers: Sequence[str]) -> ItemScores:
    """Score one prediction against its acceptable answers."""
    predicted = answer_tokens(prediction)
    golds = _golds(answers)
    prf = max((_precision_recall_f1(predicted, gold) for gold in golds), key=lambda s: (s[2], s[0]))
    return ItemScores(
        exact_match=float(any(predicted == gold for gold in golds)),
        f1=prf[2],
        precision=prf[0],
        contains=float(any(_contains_tokens(predicted, gold) for gold in golds)),
        length=len(predicted),
    )


# --- bootstrap -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _as_array(values: Values, name: str) -> npt.NDArray[np.float64]:
    array = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty sequence of numbers")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    return array


def _check_options(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be strictly between 0 and 1")


def _bootstrap_distribution(
    values: npt.NDArray[np.float64], quantile: float | None, resamples: int, seed: int
) -> npt.NDArray[np.float64]:
    """The statistic (mean, or the given quantile) of each of `resamples` resamples with replacement."""
    rng = np.random.default_rng(seed)
    n = values.size
    chunk = max(1, _MAX_CHUNK_ELEMENTS // n)
    parts = []
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        sample = values[rng.integers(0, n, size=(rows, n))]
        parts.append(sample.mean(axis=1) if quantile is None else np.quantile(sample, quantile, axis=1))
    return np.concatenate(parts)


def _interval(distribution: npt.NDArray[np.float64], confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(distribution, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap(
    values: Values,
    *,
    quantile: float | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> Estimate:
    """Mean (or `quantile`, in [0, 1]) of `values` with a percentile-bootstrap confidence interval."""
    array = _as_array(values, "values")
    _check_options(resamples, confidence)
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ValueError("quantile must be in [0, 1]")
    point = float(array.mean() if quantile is None else np.quantile(array, quantile))
    low, high = _interval(_bootstrap_distribution(array, quantile, resamples, seed), confidence)
    return Estimate(point, low, high)


@dataclass(frozen=True, slots=True)
class Summary:
    """Aggregate metrics of one system over a set of items; latency fields are None when not measured."""

    n: int
    accuracy: Estimate
    precision: Estimate
    f1: Estimate
    exact_match: Estimate
    answer_length: Estimate
    latency_p50: Estimate | None = None
    latency_p95: Estimate | None = None
    ttft_p50: Estimate | None = None
    ttft_p95: Estimate | None = None


def summarize(
    scores: Sequence[ItemScores],
    *,
    latencies: Values | None = None,
    ttfts: Values | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> Summary:
    """Aggregate per-item scores (and optional per-item latency / time to first token, any unit)."""
    if not scores:
        raise ValueError("cannot summarise zero items")

    # The same seed and item count give the same resample indices for every metric, so the intervals of
    # the quality metrics come from one shared set of resamples.
    def mean_of(values: Values) -> Estimate:
        return bootstrap(values, resamples=resamples, confidence=confidence, seed=seed)

    def quantile_of(values: Values | None, q: float, name: str) -> Estimate | None:
        if values is None:
            return None
        return bootstrap(
            _as_array(values, name), quantile=q, resamples=resamples, confidence=confidence, seed=seed
        )

    return Summary(
        n=len(scores),
        accuracy=mean_of(s.contains for s in scores),
        precision=mean_of(s.precision for s in scores),
        f1=mean_of(s.f1 for s in scores),
        exact_match=mean_of(s.exact_match for s in scores),
        answer_length=mean_of(s.length for s in scores),
        latency_p50=quantile_of(latencies, 0.50, "latencies"),
        latency_p95=quantile_of(latencies, 0.95, "latencies"),
        ttft_p50=quantile_of(ttfts, 0.50, "ttfts"),
        ttft_p95=quantile_of(ttfts, 0.95, "ttfts"),
    )


@dataclass(frozen=True, slots=True)
class PairedDifference:
    """Bootstrap of mean(candidate - baseline) over the same items."""

    mean_difference: float
    low: float
    high: float
    # Share of bootstrap resamples whose mean difference is <= 0: how plausible "no improvement" is.
    prob_not_better: float
    n: int
    resamples: int


def paired_bootstrap(
    candidate: Values,
    baseline: Values,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> PairedDifference:
    """Paired bootstrap of the difference of two systems' per-item scores (candidate minus baseline)."""
    first = _as_array(candidate, "candidate")
    second = _as_array(baseline, "baseline")
    if first.shape != second.shape:
        raise ValueError(f"paired scores need the same items: {first.size} vs {second.size} values")
    _check_options(resamples, confidence)
    # Resampling item indices (not each system separately) keeps the pairing, which removes the
    # between-item variance that both systems share.
    distribution = _bootstrap_distribution(first - second, None, resamples, seed)
    low, high = _interval(distribution, confidence)
    return PairedDifference(
        mean_difference=float((first - second).mean()),
        low=low,
        high=high,
        prob_not_better=float(np.mean(distribution <= 0.0)),
        n=int(first.size),
        resamples=resamples,
    )
