"""The inference service's parts wired once: the model router, the interaction sink, the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from flywheel_common.auth import Authenticator, load_tokens
from flywheel_common.dev_secrets import DEV_PSEUDONYM_KEY, DEV_QUERY_ID_KEY
from flywheel_common.grpc_server import GrpcServer
from flywheel_common.query_ids import QueryIdSigner
from flywheel_common.registry import ModelRegistry
from flywheel_common.secrets import read_secret
from flywheel_inference.interactions import build_sink
from flywheel_inference.router import ModelRouter
from flywheel_inference.service import InferenceServicer
from flywheel_inference.settings import InferenceSettings
from flywheel_model.engine import EngineSettings
from flywheel_proto.flywheel.inference.v1 import inference_pb2_grpc

log = logging.getLogger("flywheel_inference")


class InferenceApp:
    """The service's parts, wired once; `start` and `stop` are used by main() and by tests."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        limits = settings.limits
        registry = None if settings.model_dir else ModelRegistry(settings.artifact_root)
        pseudonym_key = read_secret(
            settings.pseudonym_key_file, name="pseudonym key", dev_default=DEV_PSEUDONYM_KEY
        )
        self.router = ModelRouter(
            registry,
            settings.ort,
            EngineSettings(
                context_token_budget=limits.context_token_budget,
                passage_max_words=limits.passage_max_words,
                max_batch=limits.max_batch,
                answer_candidates=limits.answer_candidates,
                max_queue=limits.max_in_flight,
            ),
            # The canary split is keyed with the pseudonym key (in its own domain): a server secret.
            canary_key=pseudonym_key,
            local_model_dir=settings.model_dir,
        )
        query_id_key = read_secret(
            settings.query_id_key_file, name="query id key", dev_default=DEV_QUERY_ID_KEY
        )
        self.sink = build_sink(settings, query_id_key) if settings.kafka_enabled else None
        signer = QueryIdSigner(query_id_key)
        self.servicer = InferenceServicer(
            self.router,
            limits,
            signer,
            pseudonym_key,
            self.sink,
            authenticator=Authenticator(load_tokens(settings.auth.tokens_file)),
            evidence=settings.evidence,
        )
        self.server = GrpcServer(settings.grpc, "inference")
        self.server.add_service(
            "flywheel.inference.v1.InferenceService",
            lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.servicer, s),
        )
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Starts serving; health turns SERVING once a model is loaded."""
        port = await self.server.start()
        self._watch = asyncio.create_task(self._watch_registry())
        return port

    async def _watch_registry(self) -> None:
        while True:
            try:
                await self.router.refresh()
            except Exception:
                log.exception("could not apply the registry's rollout state")
            await self.server.set_serving(self.router.ready)
            await asyncio.sleep(self.settings.registry_poll_s)

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight ones finish, then flushes interactions."""
        await self.server.stop(grace)
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.router.close()
        if self.sink is not None:
            await asyncio.to_thread(self.sink.close)
