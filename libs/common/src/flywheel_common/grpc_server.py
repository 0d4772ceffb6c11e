"""The one builder of Flywheel's gRPC servers: interceptors, health, reflection, limits, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import propagate, trace

from flywheel_common.errors import FlywheelError, InvalidArgument
from flywheel_common.logging import request_id_var
from flywheel_common.metrics import GRPC_DURATION, GRPC_REQUESTS
from flywheel_common.settings import GrpcSettings

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"


def request_metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """A call's text metadata as a dict (binary `-bin` values left out)."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class _Malformed:
    """A request body that did not parse (corrupt wire format, a string field that is not UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The deserializer, returning _Malformed instead of raising: grpc would answer UNKNOWN with
    the parser's message, counted as a server error, for what is the caller's bad input."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return _Malformed(exc)

    return parse


def _reject_malformed(request: Any) -> None:
    if isinstance(request, _Malformed):
        raise InvalidArgument(
            "the request is not a valid message (corrupt, or a string field that is not UTF-8)"
        )


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Request id, tracing span, Prometheus metrics and domain error -> status, for every call."""

    def __init__(self, service: str) -> None:
        self._service = service
        self._tracer = trace.get_tracer("flywheel.grpc")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    @contextlib.asynccontextmanager
    async def _call(self, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
        started = time.perf_counter()
        metadata = request_metadata(context)
        request_id = metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex
        request_id_var.set(request_id)
        code = "OK"
        span_name = f"{self._service}/{method}"
        with self._tracer.start_as_current_span(span_name, context=propagate.extract(metadata)) as span:
            span.set_attribute("flywheel.request_id", request_id)
            try:
                context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                yield
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "OK"
            except FlywheelError as exc:
                code = exc.code.name
                log.info("%s rejected: %s", method, exc, extra={"code": code})
                await context.abort(exc.code, str(exc))
            except grpc.aio.AbortError:
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                log.exception("%s failed", method)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
            finally:
                GRPC_REQUESTS.labels(self._service, method, code).inc()
                GRPC_DURATION.labels(self._service, method).observe(time.perf_counter() - started)

    def _wrap_unary(
        self, behavior: Callable[..., Awaitable[Any]], method: str
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._call(context, method):
                _reject_malformed(request)
                return await behavior(request, context)

        return wrapper

    def _wrap_stream(
        self, behavior: Callable[..., AsyncIterator[Any]], method: str
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._call(context, method):
                _reject_malformed(request)
                async for item in behavior(request, context):
                    yield item

        return wrapper


class GrpcServer:
    """A grpc.aio server with health and reflection; health turns SERVING only when told."""

    def __init__(
        self,
        settings: GrpcSettings,
        service: str,
        *,
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.settings = settings
        self.service = service
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", int(settings.reuse_port)),
        ]
        self.server = grpc.aio.server(
            interceptors=[ServerInterceptor(service), *interceptors], options=options
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]
        self.port = 0

    def add_service(self, full_name: str, register: Callable[[grpc.aio.Server], None]) -> None:
        """Registers a servicer (`register(server)`) under its full proto service name."""
        register(self.server)
        self._service_names.append(full_name)

    async def start(self) -> int:
        """Binds and starts serving (health NOT_SERVING until set_serving); returns the port."""
        reflection.enable_server_reflection(self._service_names, self.server)
        address = f"{self.settings.host}:{self.settings.port}"
        if self.settings.tls_cert_file and self.settings.tls_key_file:
            credentials = grpc.ssl_server_credentials(
                [(self.settings.tls_key_file.read_bytes(), self.settings.tls_cert_file.read_bytes())]
            )
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind gRPC server to {address}")
        await self.set_serving(False)
        await self.server.start()
        log.info("%s gRPC on %s:%d", self.service, self.settings.host, self.port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Reports SERVING (ready) or NOT_SERVING, for the whole server and each service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Turns health to NOT_SERVING, then lets in-flight calls finish within the grace."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_s if grace is None else grace)
