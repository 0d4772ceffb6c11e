"""Entry point: `python -m flywheel_evaluator` gates candidates, runs canaries, promotes and rolls back."""

from __future__ import annotations

from flywheel_common.runtime import run_service
from flywheel_evaluator.app import EvaluatorApp
from flywheel_evaluator.settings import EvaluatorSettings


def main() -> None:
    run_service(EvaluatorApp, EvaluatorSettings, "evaluator")


if __name__ == "__main__":
    main()
