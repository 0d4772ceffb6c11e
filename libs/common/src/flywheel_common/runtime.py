"""What every service's start-up shares: the `main()` tail, connecting with retry, consumer threads."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import ValidationError
from pydantic_settings import SettingsError

from flywheel_common.kafka import EventConsumer
from flywheel_common.logging import configure_logging
from flywheel_common.metrics import CONSUMER_RESTARTS, start_metrics_server
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
T = TypeVar("T")


def _variable(loc: tuple[int | str, ...], env_prefix: str) -> str:
    # The field path as far as variables nest: an index into a list is part of the list's value.
    names: list[str] = []
    for part in loc:
        if not isinstance(part, str):
            break
        names.append(part)
    return env_prefix + ("__".join(names).upper() if names else "*")


def settings_errors(error: ValidationError | SettingsError, env_prefix: str) -> list[str]:
    """One line per error: the environment variable that sets the field, and what is wrong with it
    (never the value, which may be a secret)."""
    if isinstance(error, SettingsError):  # a variable that is not the JSON its nested model needs
        field = re.search(r'field "([^"]+)"', str(error))
        where = _variable((field.group(1),) if field else (), env_prefix)
        return [f"{where}: cannot parse it: {error.__cause__}" if error.__cause__ else f"{where}: {error}"]
    return [
        f"{_variable(e['loc'], env_prefix)}: {' '.join(e['msg'].split())}"
        for e in error.errors(include_url=False)
    ]


def load_settings(settings: Callable[[], T]) -> T:
    """`settings()` (a pydantic-settings class) from the environment. A bad value ends the process
    with exit status 2 and one line per error on stderr that names its variable: a traceback would
    name only the field, and logging is not configured before the settings are."""
    try:
        return settings()
    except (ValidationError, SettingsError) as error:
        env_prefix = str(getattr(settings, "model_config", {}).get("env_prefix", ""))
        for line in settings_errors(error, env_prefix):
            print(line, file=sys.stderr)
        raise SystemExit(2) from None


def run_service(
    app: Callable[[S], App], settings: Callable[[], S], name: str, *, freeze_gc: bool = False
) -> None:
    """`main()` of every service: settings once, JSON logs, tracing, metrics, serve until SIGTERM."""
    loaded = load_settings(settings)
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
    """Runs a consumer on its own thread until shutdown, restarting it after an unexpected error.

    Restarts are counted (flywheel_kafka_consumer_restarts_total): one that fails the same batch
    over and over restarts every few seconds, and FlywheelConsumerRestarting says so.
    """

    def __init__(self, consumer: EventConsumer, *, restart_after_s: float = RETRY_S) -> None:
        self.consumer = consumer
        self._restart_after_s = restart_after_s
        self._thread = threading.Thread(target=self._run, name=type(consumer).__name__, daemon=True)
        # At 0 from the start: the first restart must show as an increase.
        self._restarts = CONSUMER_RESTARTS.labels(consumer.group_id)

    def _run(self) -> None:
        while not self.consumer.stopping:
            try:
                self.consumer.run()
                return
            except Exception:  # the broker went away mid-poll: a fresh consumer rejoins the group
                if self.consumer.stopping:
                    return
                self._restarts.inc()
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
        """Touches `path` every few seconds while the poll loop got on within `max_age_s` (liveness).

        A consumer stuck in a batch, or one that fails the same batch over and over, stops the stamps
        and fails its probe; one waiting for a broker that is away does not (EventConsumer.run).
        """
        while True:
            if self.is_alive() and self.consumer.alive(max_age_s):
                await asyncio.to_thread(_touch, path)
            await asyncio.sleep(_HEARTBEAT_EVERY_S)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
