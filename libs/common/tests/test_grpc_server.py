"""The gRPC server builder on loopback: error mapping, request ids, health, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flywheel_common.errors import InvalidArgument, ResourceExhausted
from flywheel_common.grpc_server import REQUEST_ID_KEY, GrpcServer
from flywheel_common.metrics import GRPC_REQUESTS
from flywheel_common.settings import GrpcSettings

METHOD = "/test.Echo/Say"
STREAM = "/test.Echo/Stream"


async def say(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"bad":
        raise InvalidArgument("bad input, say something else")
    if request == b"busy":
        raise ResourceExhausted("too busy")
    if request == b"boom":
        raise RuntimeError("secret internals")
    if request == b"abort":
        await context.abort(grpc.StatusCode.NOT_FOUND, "handler aborted")
    return request.upper()


async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"one"
    if request == b"bad":
        raise InvalidArgument("bad stream")
    yield b"two"


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = GrpcServer(GrpcSettings(port=0), "test")
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server.add_service("test.Echo", lambda s: s.add_generic_rpc_handlers((handler,)))
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(0)


async def call(channel: grpc.aio.Channel, payload: bytes) -> grpc.aio.UnaryUnaryCall:
    return await channel.unary_unary(METHOD)(payload, timeout=5, metadata=((REQUEST_ID_KEY, "req-42"),))


@pytest.mark.parametrize(
    ("payload", "code", "details"),
    [
        (b"bad", grpc.StatusCode.INVALID_ARGUMENT, "bad input, say something else"),
        (b"busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "too busy"),
        (b"abort", grpc.StatusCode.NOT_FOUND, "handler aborted"),
        (b"boom", grpc.StatusCode.INTERNAL, "internal error (request id req-42)"),
    ],
)
async def test_errors_map_to_status_codes(
    channel: grpc.aio.Channel, payload: bytes, code: grpc.StatusCode, details: str
) -> None:
    before = GRPC_REQUESTS.labels("test", "Say", code.name)._value.get()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(channel, payload)
    assert err.value.code() == code
    assert err.value.details() == details
    assert "secret" not in (err.value.details() or "")
    # The server counts the call once its status is sent, so the client may see the status first.
    counter = GRPC_REQUESTS.labels("test", "Say", code.name)
    for _ in range(100):
        if counter._value.get() != before:
            break
        await asyncio.sleep(0.02)
    assert counter._value.get() == before + 1


async def test_success_echoes_the_request_id(channel: grpc.aio.Channel) -> None:
    rpc = channel.unary_unary(METHOD)(b"hi", timeout=5, metadata=((REQUEST_ID_KEY, "req-42"),))
    assert await rpc == b"HI"
    assert dict(await rpc.trailing_metadata())[REQUEST_ID_KEY] == "req-42"


async def test_stream_errors_after_items_keep_the_items(channel: grpc.aio.Channel) -> None:
    items = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for item in channel.unary_stream(STREAM)(b"bad", timeout=5):
            items.append(item)
    assert items == [b"one"]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_is_not_serving_until_told() -> None:
    server = GrpcServer(GrpcSettings(port=0), "test")
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await server.set_serving(True)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await server.stop(0)


async def test_a_taken_port_is_shared_only_when_every_server_asks_for_it() -> None:
    first = GrpcServer(GrpcSettings(port=0, reuse_port=True), "test")
    port = await first.start()
    try:
        shared = GrpcServer(GrpcSettings(port=port, reuse_port=True), "test")
        assert await shared.start() == port
        await shared.stop(0)
        # Without the setting a second server on the port fails, as it always did.
        with pytest.raises(RuntimeError):
            await GrpcServer(GrpcSettings(port=port), "test").start()
    finally:
        await first.stop(0)
