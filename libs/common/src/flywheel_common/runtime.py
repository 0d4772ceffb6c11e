"""What every service's start-up shares: the `main()` tail, connecting with retry, consumer threads."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from flywheel_common.kafka import EventConsumer
from flywheel_common.logging import configure_logging
from flywheel_common.metrics import start_metrics_server
from flywheel_common.settings import LoggingSettings, MetricsSettings, TracingSettings
from flywheel_common.tracing import configure_tracing

log = logging.getLogger(__name__)

RETRY_S = 1.0
_HEARTBEAT_EVERY_S = 5.0


class ServiceSettings(Protocol):
    """The settings `run_service` reads before it builds the app."""

    @property
    def logging(self) -> LoggingSettings: ...
    @property
    def tracing(self) -> TracingSettings: ...
    @property
    def metrics(self) -> MetricsSettings: ...


class App(Protocol):
    """A service's parts: `start` serves (returning the port), `stop` drains within `grace`."""

    async def start(self) -> int: ...
    async def stop(self, grace: float | None = None) -> None: ...


S = TypeVar("S", bound=ServiceSettings)


def run_service(
    app: Callable[[S], App], settings: Callable[[], S], name: str, *, freeze_gc: bool = False
) -> None:
    """`main()` of every service: settings once, JSON logs, tracing, metrics, serve until SIGTERM."""
    loaded = settings()
    configure_logging(loaded.logging, name)
    configure_tracing(loaded.tracing, name)
    start_metrics_server(loaded.metrics)
    asyncio.run(_serve(app, loaded, freeze_gc=freeze_gc))


async def _serve(make_app: Callable[[S], App], settings: S, *, freeze_gc: bool) -> None:
    # Built inside the running loop: gRPC's aio server and asyncio events bind to it.
    app = make_app(settings)
    if freeze_gc:
        # Libraries that leave a large heap of long-lived objects (the PII models) make every cyclic
        # collection scan it; frozen, collections under load stay cheap.
        gc.collect()
        gc.freeze()
    # The handlers only set an event, and are in place before the app starts, so a SIGTERM during
    # start-up also ends in an orderly stop.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    await stop.wait()
    log.info("shutdown signal received")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await app.stop()


async def connect_with_retry(connect: Callable[[], object], what: str = "Kafka") -> None:
    """Runs the blocking `connect` (on a thread) until it succeeds, saying once that it is retrying."""
    warned = False
    while True:
        try:
            await asyncio.to_thread(connect)
            return
        except Exception as exc:  # a KafkaError or a missing topic: keep trying, say so once
            if not warned:
                log.warning(
                    "%s not reachable yet (%s); retrying every %.0f s", what, type(exc).__name__, RETRY_S
                )
                warned = True
            await asyncio.sleep(RETRY_S)


class ConsumerThread:
    """Runs a consumer on its own thread until shutdown, restarting it after an unexpected error."""

    def __init__(self, consumer: EventConsumer, *, restart_after_s: float = RETRY_S) -> None:
        self.consumer = consumer
        self._restart_after_s = restart_after_s
        self._thread = threading.Thread(target=self._run, name=type(consumer).__name__, daemon=True)

    def _run(self) -> None:
        while not self.consumer.stopping:
            try:
                self.consumer.run()
                return
            except Exception:  # the broker went away mid-poll: a fresh consumer rejoins the group
                if self.consumer.stopping:
                    return
                log.exception(
                    "%s failed; restarting it in %.0f s", type(self.consumer).__name__, self._restart_after_s
                )
                self.consumer.wait_stopping(self._restart_after_s)

    def start(self) -> None:
        """Starts the thread."""
        self._thread.start()

    def is_alive(self) -> bool:
        """Whether the consumer's thread runs."""
        return self._thread.is_alive()

    async def stop(self, join_s: float = 60.0) -> None:
        """Asks the consumer to stop after its batch and waits for the thread (offsets committed)."""
        self.consumer.signal_shutdown()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, join_s)

    async def stamp_heartbeat(self, path: Path, max_age_s: float) -> None:
        """Touches `path` every few seconds while the poll loop turned within `max_age_s` (liveness).

        A consumer stuck in a batch, or one that keeps failing, stops the stamps and fails its probe.
        """
        while True:
            if self.is_alive() and self.consumer.alive(max_age_s):
                await asyncio.to_thread(_touch, path)
            await asyncio.sleep(_HEARTBEAT_EVERY_S)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
