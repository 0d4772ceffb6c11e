"""Entry point: `python -m flywheel_gateway` serves the widget, its API and the review console."""

from __future__ import annotations

import asyncio

from flywheel_common.grpc_server import wait_for_shutdown_signal
from flywheel_common.logging import configure_logging
from flywheel_common.metrics import start_metrics_server
from flywheel_common.tracing import configure_tracing
from flywheel_gateway.app import GatewayApp
from flywheel_gateway.settings import GatewaySettings


async def serve(settings: GatewaySettings) -> None:
    app = GatewayApp(settings)
    await app.start()
    await wait_for_shutdown_signal()
    await app.stop()


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.logging, "gateway")
    configure_tracing(settings.tracing, "gateway")
    start_metrics_server(settings.metrics)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
