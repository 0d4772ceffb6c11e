"""Unit tests for the answer metrics and the bootstrap, with hand-worked expected values."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel_eval.metrics import (
    Estimate,
    ItemScores,
    answer_length,
    answer_tokens,
    bootstrap,
    contains,
    exact_match,
    f1,
    is_token_span,
    normalize_answer,
    paired_bootstrap,
    precision,
    score_item,
    summarize,
)

# --- normalisation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Quick, Brown Fox!", "quick brown fox"),
        ("  lots\t of \n  space  ", "lots of space"),
        ("a an the", ""),
        ("An apple a day", "apple day"),
        # Articles only as whole words: "theory" and "another" keep their letters.
        ("the theory of another", "theory of another"),
        # Punctuation separates tokens, so code answers share tokens with their shorter forms.
        ("sys.path", "sys path"),
        ("os.remove(filename)", "os remove filename"),
        ("__init__.py", "init py"),
        ("x += 1", "x 1"),
        ("positional-only", "positional only"),
        # ... except an apostrophe inside a word and a separator inside a number, which are deleted.
        ("don't", "dont"),
        ("Python 3.11", "python 311"),
        ("1,000 users", "1000 users"),
        ("'quoted', he said", "quoted he said"),
        ("(parentheses) [brackets] {braces}", "parentheses brackets braces"),
        # Unicode punctuation (curly quotes, dashes, guillemets) goes too.
        ("don\u2019t \u201cquote\u201d \u2014 dash \u00abx\u00bb", "dont quote dash x"),
        # Composed and decomposed accents compare equal; accents themselves are kept.
        ("Caf\u00e9", "caf\u00e9"),
        ("Cafe\u0301", "caf\u00e9"),
        # No-break space and the fi ligature fold under NFKC.
        ("non\u00a0breaking \ufb01le", "non breaking file"),
        ("\u00c9COLE", "\u00e9cole"),
        ("", ""),
        ("   ", ""),
        ("...!?", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_tokens_and_length() -> None:
    assert answer_tokens("The GIL, of course.") == ["gil", "of", "course"]
    assert answer_length("The GIL, of course.") == 3
    assert answer_length("") == 0


# --- exact match -----------------------------------------------------------------------------------------


def test_exact_match_ignores_case_punctuation_articles() -> None:
    assert exact_match("The Global Interpreter Lock.", ["global interpreter lock"]) == 1.0
    assert exact_match("global interpreter lock, GIL", ["global interpreter lock"]) == 0.0


def test_exact_match_any_acceptable_answer() -> None:
    assert exact_match("GIL", ["global interpreter lock", "the GIL"]) == 1.0
    assert exact_match("lock", ["global interpreter lock", "the GIL"]) == 0.0


def test_exact_match_rejects_single_string_answers() -> None:
    # A bare string is a sequence of characters; accepting it would silently score against letters.
    with pytest.raises(TypeError):
        exact_match("x", "x")


# --- F1 and precision ------------------------------------------------------------------------------------


def test_f1_hand_worked() -> None:
    # pred = [big, red, ball], gold = [red, ball, game]: common 2, P = 2/3, R = 2/3, F1 = 2/3.
    assert f1("big red ball", ["red ball game"]) == pytest.approx(2 / 3)
    # pred = [red], gold = [red, ball, game]: P = 1, R = 1/3, F1 = 2 * 1/3 / (4/3) = 0.5.
    assert f1("red", ["red ball game"]) == pytest.approx(0.5)
    assert f1("blue", ["red ball game"]) == 0.0


def test_f1_counts_repeated_tokens_once_each() -> None:
    # pred = [go, go, go], gold = [go]; common = 1; P = 1/3, R = 1, F1 = 0.5.
    assert f1("go go go", ["go"]) == pytest.approx(0.5)


def test_f1_gives_partial_credit_for_shorter_code_answers() -> None:
    # pred = [os, remove], gold = [os, remove, filename]: P = 1, R = 2/3, F1 = 0.8.
    assert f1("os.remove()", ["os.remove(filename)"]) == pytest.approx(0.8)


def test_f1_max_over_answers() -> None:
    # Against "red ball game" F1 = 2/3 (above); against "big red ball" F1 = 1.
    assert f1("big red ball", ["red ball game", "big red ball"]) == 1.0


def test_precision_hand_worked() -> None:
    # pred = [red, ball, in, garden], gold = [red, ball]: 2 of 4 prediction tokens are relevant.
    assert precision("the red ball in the garden", ["a red ball"]) == pytest.approx(0.5)
    assert precision("red ball", ["red ball"]) == 1.0
    assert precision("nothing relevant", ["red ball"]) == 0.0


def test_precision_uses_best_f1_answer() -> None:
    # pred = [python, 311]. Against [python, 311, documentation]: P = 1, R = 2/3, F1 = 0.8.
    # Against [311]: P = 1/2, R = 1, F1 = 2/3. Best F1 is the first, so precision = 1.
    assert precision("Python 3.11", ["3.11", "Python 3.11 documentation"]) == 1.0


def test_precision_tie_on_f1_takes_higher_precision() -> None:
    # pred = [x, y]. Against [x]: P = 1/2, R = 1, F1 = 2/3. Against [x, y, z, w]: P = 1, R = 1/2, F1 = 2/3.
    # F1 ties, so the higher precision wins whatever the order of the acceptable answers.
    assert precision("x y", ["x", "x y z w"]) == 1.0
    assert precision("x y", ["x y z w", "x"]) == 1.0
    assert score_item("x y", ["x", "x y z w"]).precision == 1.0


# --- contains (accuracy) ---------------------------------------------------------------------------------


def test_contains_on_token_boundaries() -> None:
    assert contains("It was released in Python 3.11 last year.", ["Python 3.11"]) == 1.0
    # "3" is a prefix of the token "311", not a token of its own.
    assert contains("Python 3.11", ["3"]) == 0.0
    assert contains("The answer is lockstep", ["lock"]) == 0.0
    assert contains("Use the GIL.", ["global interpreter lock", "GIL"]) == 1.0


def test_contains_is_order_sensitive() -> None:
    assert contains("ball red", ["red ball"]) == 0.0


def test_is_token_span() -> None:
    assert is_token_span("sys.path", "Append the folder to sys.path, then import.")
    assert is_token_span("the folder", "Append the folder to sys.path, then import.")
    assert not is_token_span("3", "Added in Python 3.11.")
    assert not is_token_span("folder sys path import", "Append the folder to sys.path, then import.")


# --- empty predictions and unanswerable items ------------------------------------------------------------


def test_empty_prediction_scores_zero_on_answerable_item() -> None:
    assert score_item("", ["red ball"]) == ItemScores(
        exact_match=0.0, f1=0.0, precision=0.0, contains=0.0, length=0
    )


def test_prediction_that_normalises_to_nothing_is_empty() -> None:
    assert score_item("The.", ["red ball"]).f1 == 0.0


def test_unanswerable_item_rewards_only_an_empty_answer() -> None:
    assert score_item("", []) == ItemScores(exact_match=1.0, f1=1.0, precision=1.0, contains=1.0, length=0)
    assert score_item("A confident guess", []) == ItemScores(
        exact_match=0.0, f1=0.0, precision=0.0, contains=0.0, length=2
    )


def test_score_item_agrees_with_single_metrics() -> None:
    prediction, answers = "the big red ball", ["red ball game", "ball"]
    scores = score_item(prediction, answers)
    assert scores.exact_match == exact_match(prediction, answers)
    assert scores.f1 == f1(prediction, answers)
    assert scores.precision == precision(prediction, answers)
    assert scores.contains == contains(prediction, answers)
    assert scores.length == answer_length(prediction) == 3


# --- bootstrap -------------------------------------------------------------------------------------------


def test_bootstrap_point_estimates() -> None:
    values = [0.0, 1.0, 1.0, 1.0]
    estimate = bootstrap(values, resamples=200)
    assert estimate.value == 0.75
    assert 0.0 <= estimate.low <= estimate.value <= estimate.high <= 1.0
    assert bootstrap([1.0, 2.0, 3.0, 4.0, 100.0], quantile=0.5).value == 3.0


def test_bootstrap_constant_values_have_zero_width() -> None:
    estimate = bootstrap([0.4] * 30)
    assert (estimate.value, estimate.low, estimate.high) == pytest.approx((0.4, 0.4, 0.4))


def test_bootstrap_is_deterministic_per_seed() -> None:
    values = np.random.default_rng(1).random(50)
    assert bootstrap(values, seed=7) == bootstrap(values, seed=7)
    assert bootstrap(values, seed=7) != bootstrap(values, seed=8)


def test_bootstrap_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import flywheel_eval.metrics as metrics

    values = np.random.default_rng(2).random(40)
    whole = bootstrap(values, resamples=300, seed=3)
    # Force many small chunks: the generator stream is the same, so the draws must be too.
    monkeypatch.setattr(metrics, "_MAX_CHUNK_ELEMENTS", 40 * 7)
    assert bootstrap(values, resamples=300, seed=3) == whole


def test_bootstrap_interval_narrows_with_more_items() -> None:
    rng = np.random.default_rng(4)
    small = bootstrap(rng.random(20), seed=0)
    large = bootstrap(rng.random(2000), seed=0)
    assert (large.high - large.low) < (small.high - small.low) / 4


def test_bootstrap_coverage_close_to_nominal() -> None:
    # 400 simulated evaluations of 100 Bernoulli(0.3) items: a 95% interval should cover 0.3 roughly 95%
    # of the time. The percentile bootstrap runs a little narrow at this size, so allow 88%..99%.
    rng = np.random.default_rng(5)
    covered = 0
    trials = 400
    for trial in range(trials):
        sample = (rng.random(100) < 0.3).astype(float)
        estimate = bootstrap(sample, resamples=500, seed=trial)
        covered += estimate.low <= 0.3 <= estimate.high
    assert 0.88 <= covered / trials <= 0.99


@pytest.mark.parametrize(
    "kwargs",
    [{"resamples": 0}, {"confidence": 1.0}, {"confidence": 0.0}, {"quantile": 1.5}],
)
def test_bootstrap_rejects_bad_options(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        bootstrap([1.0, 2.0], **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("values", [[], [float("nan")], [float("inf"), 1.0]])
def test_bootstrap_rejects_bad_values(values: list[float]) -> None:
    with pytest.raises(ValueError):
        bootstrap(values)


# --- summary ---------------------------------------------------------------------------------------------


def test_summarize_hand_worked() -> None:
    scores = [
        score_item("red ball", ["red ball"]),  # EM 1, F1 1, P 1, contains 1, length 2
        score_item("a big red ball", ["red ball"]),  # EM 0, F1 0.8, P 2/3, contains 1, length 3
        score_item("blue", ["red ball"]),  # all 0, length 1
        score_item("", []),  # abstention on an unanswerable item: all 1, length 0
    ]
    summary = summarize(scores, latencies=[0.1, 0.2, 0.3, 0.4], ttfts=[0.01, 0.02, 0.03, 0.04], resamples=100)
    assert summary.n == 4
    assert summary.exact_match.value == pytest.approx(2 / 4)
    assert summary.f1.value == pytest.approx((1 + 0.8 + 0 + 1) / 4)
    assert summary.precision.value == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
    assert summary.accuracy.value == pytest.approx(3 / 4)
    assert summary.answer_length.value == pytest.approx(6 / 4)
    assert summary.latency_p50 is not None and summary.latency_p50.value == pytest.approx(0.25)
    # Linear interpolation: position 0.95 * 3 = 2.85 between 0.3 and 0.4.
    assert summary.latency_p95 is not None and summary.latency_p95.value == pytest.approx(0.385)
    assert summary.ttft_p50 is not None and summary.ttft_p50.value == pytest.approx(0.025)
    assert summary.ttft_p95 is not None and summary.ttft_p95.value == pytest.approx(0.0385)


def test_summarize_without_latencies() -> None:
    summary = summarize([score_item("x", ["x"])])
    assert summary.latency_p50 is None and summary.ttft_p95 is None
    assert summary.accuracy == Estimate(1.0, 1.0, 1.0)


def test_summarize_rejects_no_items() -> None:
    with pytest.raises(ValueError):
        summarize([])


# --- paired bootstrap ------------------------------------------------------------------------------------


def test_paired_bootstrap_clear_improvement() -> None:
    baseline = [0.0] * 50 + [1.0] * 50
    candidate = [1.0] * 90 + [0.0] * 10
    result = paired_bootstrap(candidate, baseline, resamples=2000, seed=1)
    assert result.mean_difference == pytest.approx(0.4)
    assert 0.0 < result.low < 0.4 < result.high
    assert result.prob_not_better == 0.0
    assert (result.n, result.resamples) == (100, 2000)


def test_paired_bootstrap_identical_systems_are_not_better() -> None:
    scores = list(np.random.default_rng(6).random(60))
    result = paired_bootstrap(scores, scores)
    assert result.mean_difference == 0.0
    assert result.low == result.high == 0.0
    assert result.prob_not_better == 1.0


def test_paired_bootstrap_regression_is_likely_not_better() -> None:
    rng = np.random.default_rng(7)
    baseline = rng.random(200)
    result = paired_bootstrap(baseline - 0.1, baseline)
    assert result.mean_difference == pytest.approx(-0.1)
    assert result.prob_not_better == 1.0


def test_paired_bootstrap_pairing_beats_unpaired_noise() -> None:
    # Items vary a lot in difficulty but the candidate is uniformly 0.02 better: the paired interval
    # is tight and excludes zero even though each system's own interval is wide.
    rng = np.random.default_rng(8)
    difficulty = rng.random(100)
    result = paired_bootstrap(difficulty + 0.02, difficulty)
    assert result.low == pytest.approx(0.02) and result.high == pytest.approx(0.02)
    alone = bootstrap(difficulty)
    assert alone.high - alone.low > 0.05


def test_paired_bootstrap_is_deterministic() -> None:
    rng = np.random.default_rng(9)
    first, second = rng.random(30), rng.random(30)
    assert paired_bootstrap(first, second, seed=3) == paired_bootstrap(first, second, seed=3)


def test_paired_bootstrap_needs_same_items() -> None:
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap([1.0, 0.0], [1.0])
