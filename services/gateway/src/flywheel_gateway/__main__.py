"""Entry point: `python -m flywheel_gateway` serves the widget, its API and the review console."""

from __future__ import annotations

from flywheel_common.runtime import run_service
from flywheel_gateway.app import GatewayApp
from flywheel_gateway.settings import GatewaySettings


def main() -> None:
    run_service(GatewayApp, GatewaySettings, "gateway")


if __name__ == "__main__":
    main()
