"""Entry point: `python -m flywheel_trainer` consumes feedback, batches it and launches training jobs."""

from __future__ import annotations

from flywheel_common.runtime import run_service
from flywheel_trainer.app import TrainerApp
from flywheel_trainer.settings import TrainerSettings


def main() -> None:
    run_service(TrainerApp, TrainerSettings, "trainer")


if __name__ == "__main__":
    main()
