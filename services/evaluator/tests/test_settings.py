"""Settings under which a canary can never be decided on evidence are refused at start, with the reason."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flywheel_common.runtime import load_settings
from flywheel_evaluator.settings import CanarySettings, EvaluatorSettings


def test_a_canary_serving_every_session_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Production would get no session, so the canary would never have a side to compare with.
    monkeypatch.setenv("FLYWHEEL_EVALUATOR_CANARY__FRACTION", "1")
    with pytest.raises(ValidationError, match=r"canary\.fraction must be below 1"):
        EvaluatorSettings()
    with pytest.raises(SystemExit):  # main() stops before anything starts, saying why
        load_settings(EvaluatorSettings)
    assert (
        "FLYWHEEL_EVALUATOR_CANARY: Value error, canary.fraction must be below 1" in capsys.readouterr().err
    )
    monkeypatch.setenv("FLYWHEEL_EVALUATOR_CANARY__ENABLED", "false")  # unused then
    assert EvaluatorSettings().canary.fraction == 1


def test_a_minimum_duration_above_the_maximum_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"min_duration_s \(3600 s\) is above canary\.max_duration_s"):
        CanarySettings(min_duration_s=3600, max_duration_s=600)
    assert CanarySettings(min_duration_s=600, max_duration_s=600).min_duration_s == 600


def test_live_signals_kept_shorter_than_a_canary_may_run_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"live\.retention_s \(300 s\) is shorter"):
        EvaluatorSettings(live={"retention_s": 300}, canary={"max_duration_s": 600})
    assert (
        EvaluatorSettings(live={"retention_s": 600}, canary={"max_duration_s": 600}).live.retention_s == 600
    )
