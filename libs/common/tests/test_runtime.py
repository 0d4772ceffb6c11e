"""The start-up every service shares: main() serves until SIGTERM, Kafka is retried, consumers restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import REGISTRY
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings

from flywheel_common.kafka import EventConsumer
from flywheel_common.runtime import ConsumerThread, connect_with_retry, load_settings
from flywheel_common.settings import KafkaSettings, env_config

# A service as `python -m` runs it: the app builds a gRPC server and an asyncio event in __init__,
# which only works when run_service builds it inside the running loop.
SERVICE = textwrap.dedent(
    """
    import asyncio
    from pydantic import BaseModel
    from flywheel_common.grpc_server import GrpcServer
    from flywheel_common.runtime import run_service
    from flywheel_common.settings import GrpcSettings, LoggingSettings, MetricsSettings, TracingSettings

    class Settings(BaseModel):
        logging: LoggingSettings = LoggingSettings()
        tracing: TracingSettings = TracingSettings()
        metrics: MetricsSettings = MetricsSettings(port=0)

    class App:
        def __init__(self, settings: Settings) -> None:
            self.server = GrpcServer(GrpcSettings(port=0, grace_s=0), "test")
            self.ready = asyncio.Event()

        async def start(self) -> int:
            port = await self.server.start()
            print("serving", port, flush=True)
            return port

        async def stop(self, grace: float | None = None) -> None:
            await self.server.stop(grace)
            print("stopped", flush=True)

    run_service(App, Settings, "test")
    """
)

# A service whose settings do not validate: it must end before the app is built, naming the variables.
BAD_SETTINGS = textwrap.dedent(
    """
    from pydantic import Field
    from pydantic_settings import BaseSettings
    from flywheel_common.runtime import run_service
    from flywheel_common.settings import LoggingSettings, MetricsSettings, TracingSettings, env_config

    class Settings(BaseSettings):
        model_config = env_config("FLYWHEEL_TEST_")

        logging: LoggingSettings = LoggingSettings()
        tracing: TracingSettings = TracingSettings()
        metrics: MetricsSettings = MetricsSettings(port=0)
        workers: int = Field(default=1, ge=1)

    def build(settings: Settings) -> None:
        raise AssertionError("the app is built from bad settings")

    run_service(build, Settings, "test")
    """
)


def test_run_service_serves_until_sigterm() -> None:
    process = subprocess.Popen([sys.executable, "-c", SERVICE], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        # Logs are JSON lines on the same stdout; the app's own lines are plain.
        assert any(line.startswith("serving ") for line in iter(process.stdout.readline, ""))
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert "stopped" in process.stdout.read().splitlines()
    finally:
        process.kill()


class RateLimit(BaseModel):
    burst: int = Field(default=5, ge=1)


class ExampleSettings(BaseSettings):
    model_config = env_config("FLYWHEEL_EXAMPLE_")

    rate_limit: RateLimit = RateLimit()
    hosts: list[int] = []


def test_a_bad_setting_names_its_environment_variable_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLYWHEEL_EXAMPLE_RATE_LIMIT__BURST", "0")
    monkeypatch.setenv("FLYWHEEL_EXAMPLE_HOSTS", '[1, "secret-token"]')
    with pytest.raises(SystemExit) as exit_:
        load_settings(ExampleSettings)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "FLYWHEEL_EXAMPLE_RATE_LIMIT__BURST: Input should be greater than or equal to 1",
        # An item of a list is set by the list's variable; the value (maybe a secret) is not echoed.
        "FLYWHEEL_EXAMPLE_HOSTS: Input should be a valid integer, unable to parse string as an integer",
    ]
    monkeypatch.setenv("FLYWHEEL_EXAMPLE_RATE_LIMIT", "{burst: 2")
    with pytest.raises(SystemExit):
        load_settings(ExampleSettings)
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("FLYWHEEL_EXAMPLE_RATE_LIMIT: cannot parse it: Expecting property name")


def test_run_service_refuses_bad_settings_before_it_starts() -> None:
    env = {**os.environ, "FLYWHEEL_TEST_WORKERS": "0", "FLYWHEEL_TEST_METRICS__PORT": "port"}
    done = subprocess.run(
        [sys.executable, "-c", BAD_SETTINGS], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "FLYWHEEL_TEST_METRICS__PORT: Input should be a valid integer, unable to parse string as an integer",
        "FLYWHEEL_TEST_WORKERS: Input should be greater than or equal to 1",
    ]


async def test_connect_with_retry_keeps_trying() -> None:
    calls: list[int] = []

    def connect() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("broker not up yet")

    await asyncio.wait_for(connect_with_retry(connect), 30)
    assert len(calls) == 3


class FlakyConsumer(EventConsumer):
    """Fails on its first run, as a consumer does when the broker goes away mid-poll."""

    def __init__(self) -> None:
        super().__init__(KafkaSettings(), ["t"], "g")
        self.runs = 0
        self.second_run = threading.Event()

    def run(self) -> None:
        self.runs += 1
        if self.runs == 1:
            raise ConnectionError("broker went away")
        self.second_run.set()
        self.wait_stopping(30)

    def handle(self, records: list[ConsumerRecord]) -> None:
        raise AssertionError("not polled here")


def restarts(group: str) -> float | None:
    return REGISTRY.get_sample_value("flywheel_kafka_consumer_restarts_total", {"group": group})


async def test_consumer_thread_restarts_a_failed_consumer_and_stops() -> None:
    consumer = FlakyConsumer()
    thread = ConsumerThread(consumer, restart_after_s=0.05)
    before = restarts("g")
    assert before is not None, "the series is there before the first restart"
    thread.start()
    assert await asyncio.to_thread(consumer.second_run.wait, 30)
    await thread.stop(join_s=30)
    assert not thread.is_alive() and consumer.runs == 2
    assert restarts("g") == before + 1
