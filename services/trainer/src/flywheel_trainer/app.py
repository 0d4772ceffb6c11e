"""The trainer's parts wired once: the consumer, the trainer, the gRPC server and their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kafka.errors import KafkaError

from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.dev_secrets import DEV_PSEUDONYM_KEY
from flywheel_common.grpc_server import GrpcServer
from flywheel_common.kafka import EventProducer, ensure_topics
from flywheel_common.registry import ModelRegistry
from flywheel_common.runtime import ConsumerThread, connect_with_retry
from flywheel_common.secrets import read_secret
from flywheel_proto.flywheel.trainer.v1 import trainer_pb2_grpc
from flywheel_trainer.consumer import TrainerConsumer
from flywheel_trainer.launchers import JobLauncher, build_launcher
from flywheel_trainer.policy import ExamplePolicy
from flywheel_trainer.service import TrainerServicer
from flywheel_trainer.settings import TrainerSettings
from flywheel_trainer.store import JoinStore
from flywheel_trainer.trainer import Trainer

log = logging.getLogger("flywheel_trainer")

STORE_FILE = "trainer.sqlite3"


class TrainerApp:
    """The service's parts, wired once; `start` and `stop` are used by main() and by tests."""

    def __init__(self, settings: TrainerSettings, *, launcher: JobLauncher | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = JoinStore(settings.data_dir / STORE_FILE, ExamplePolicy(settings.policy))
        self.registry = ModelRegistry(settings.artifact_root)
        self.launcher = launcher or build_launcher(settings)
        self.producer = EventProducer(settings.kafka, linger_ms=0, bootstrap_timeout_ms=5000)
        self.trainer = Trainer(settings, self.store, self.launcher, self.registry, self.producer)
        self.consumer = TrainerConsumer(settings, self.store)
        self._consuming = ConsumerThread(self.consumer)
        self.server = GrpcServer(settings.grpc, "trainer")
        pseudonym_key = read_secret(
            settings.pseudonym_key_file, name="pseudonym key", dev_default=DEV_PSEUDONYM_KEY
        )
        servicer = TrainerServicer(
            self.trainer, Authenticator(load_tokens(settings.auth.tokens_file)), pseudonym_key
        )
        self.server.add_service(
            "flywheel.trainer.v1.TrainerService",
            lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s),
        )
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    async def start(self) -> int:
        """Serves gRPC at once; health turns SERVING when the consumer has its partitions."""
        port = await self.server.start()
        await self.trainer.recover()
        self._tasks = [
            asyncio.create_task(self._connect(), name="trainer-connect"),
            asyncio.create_task(self.trainer.run(), name="trainer-loop"),
            asyncio.create_task(self._heartbeat(), name="trainer-heartbeat"),
        ]
        return port

    def _connect_kafka(self) -> None:
        if self.settings.create_topics:
            ensure_topics(self.settings.kafka)

    async def _connect(self) -> None:
        await connect_with_retry(self._connect_kafka)
        loop = asyncio.get_running_loop()
        assigned = asyncio.Event()
        self.consumer.on_assigned = lambda: loop.call_soon_threadsafe(assigned.set)
        self._consuming.start()
        await assigned.wait()
        await self.server.set_serving(True)
        self.ready.set()
        log.info(
            "trainer ready: consuming %s as group %s",
            ", ".join(self.consumer.topics),
            self.settings.consumer.group_id,
        )

    async def _heartbeat(self) -> None:
        # The file is stamped only while the poll loop turns: a stuck consumer fails liveness.
        path = self.settings.consumer.heartbeat_file
        if path is not None:
            await self._consuming.stamp_heartbeat(path, self.settings.consumer.heartbeat_max_age_s)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, calls drain, the consumer leaves its group (offsets committed), jobs
        are stopped or left to be adopted, the producer is flushed. Stopping twice does nothing."""
        if self._stopped:
            return
        self._stopped = True
        await self.server.stop(grace)
        await self._consuming.stop(30)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.trainer.shutdown()
        with contextlib.suppress(KafkaError):
            await asyncio.to_thread(self.producer.close)
        self.store.close()
