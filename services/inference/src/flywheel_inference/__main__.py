"""Entry point: `python -m flywheel_inference` serves the registry's production model over gRPC."""

from __future__ import annotations

from flywheel_common.runtime import run_service
from flywheel_inference.app import InferenceApp
from flywheel_inference.settings import InferenceSettings


def main() -> None:
    run_service(InferenceApp, InferenceSettings, "inference")


if __name__ == "__main__":
    main()
