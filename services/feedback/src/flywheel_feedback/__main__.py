"""Entry point: `python -m flywheel_feedback` takes feedback over gRPC and stores it on Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

from kafka.errors import KafkaError

from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.grpc_server import GrpcServer, wait_for_shutdown_signal
from flywheel_common.kafka import EventProducer, ensure_topics
from flywheel_common.logging import configure_logging
from flywheel_common.metrics import start_metrics_server
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.redaction import Redactor
from flywheel_common.secrets import read_secret
from flywheel_common.tracing import configure_tracing
from flywheel_feedback.service import FeedbackServicer
from flywheel_feedback.settings import FeedbackSettings
from flywheel_proto.flywheel.feedback.v1 import feedback_pb2_grpc

log = logging.getLogger("flywheel_feedback")

DEV_QUERY_ID_KEY = b"flywheel-dev-query-id-key"
DEV_PSEUDONYM_KEY = b"flywheel-dev-pseudonym-key"
_RETRY_S = 1.0


class FeedbackApp:
    """The service's parts, wired once; `start` and `stop` are used by main() and by tests."""

    def __init__(self, settings: FeedbackSettings, *, redactor: Redactor | None = None) -> None:
        self.settings = settings
        privacy = settings.privacy
        self.producer = EventProducer(
            settings.kafka,
            linger_ms=settings.linger_ms,
            delivery_timeout_ms=settings.produce_timeout_ms,
            bootstrap_timeout_ms=5000,
        )
        self.redactor = redactor or Redactor(
            presidio=privacy.presidio, score_threshold=privacy.presidio_score_threshold
        )
        signer = QueryIdSigner(
            read_secret(privacy.query_id_key_file, name="query id key", dev_default=DEV_QUERY_ID_KEY),
            max_age_s=settings.validation.query_id_max_age_s,
        )
        pseudonym_key = read_secret(
            privacy.pseudonym_key_file, name="pseudonym key", dev_default=DEV_PSEUDONYM_KEY
        )
        self.servicer = FeedbackServicer(
            settings,
            producer=self.producer,
            authenticator=Authenticator(load_tokens(settings.auth.tokens_file)),
            redactor=self.redactor,
            signer=signer,
            pseudonym_key=pseudonym_key,
        )
        self.server = GrpcServer(settings.grpc, "feedback")
        self.server.add_service(
            "flywheel.feedback.v1.FeedbackService",
            lambda s: feedback_pb2_grpc.add_FeedbackServiceServicer_to_server(self.servicer, s),
        )
        self.ready = asyncio.Event()
        self._connect_task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Starts serving; health turns SERVING once Kafka is reachable and the topic exists."""
        port = await self.server.start()
        self._connect_task = asyncio.create_task(self._connect())
        return port

    async def _connect(self) -> None:
        topic = self.settings.kafka.topics.feedback
        warned = False
        while True:
            try:
                if self.settings.create_topics:
                    await asyncio.to_thread(ensure_topics, self.settings.kafka)
                await asyncio.to_thread(self.producer.connect, [topic])
                break
            except Exception as exc:  # KafkaError or a missing topic: keep trying, say so once
                if not warned:
                    log.warning(
                        "Kafka not reachable yet (%s); retrying every %.0f s", type(exc).__name__, _RETRY_S
                    )
                    warned = True
                await asyncio.sleep(_RETRY_S)
        await self.server.set_serving(True)
        self.ready.set()
        log.info("feedback ready: producing to %s on %s", topic, self.settings.kafka.bootstrap_servers)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, in-flight calls finish within the grace, then the producer is flushed."""
        await self.server.stop(grace)
        if self._connect_task is not None:
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connect_task
        with contextlib.suppress(KafkaError):
            await asyncio.to_thread(self.producer.close)


async def serve(settings: FeedbackSettings) -> None:
    app = FeedbackApp(settings)
    # The PII libraries leave a large heap of long-lived objects; keeping them out of the cyclic
    # GC's scans makes collections under load cheap.
    gc.collect()
    gc.freeze()
    await app.start()
    await wait_for_shutdown_signal()
    await app.stop()


def main() -> None:
    settings = FeedbackSettings()
    configure_logging(settings.logging, "feedback")
    configure_tracing(settings.tracing, "feedback")
    start_metrics_server(settings.metrics)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
